"""GroupMamba, Spatial-Mamba, MambaVision, MambaOut and the Mamba-2 mixer: published sizes and the
behaviour specific to each (group directions, state fusion, windows, causality, no SSM)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mz_backbones import create_backbone
from mz_backbones.families.groupmamba import GroupScan
from mz_backbones.families.mambavision import MambaVisionMixer, window_partition, window_reverse
from mz_backbones.families.spatialmamba import SpatialSSM
from mz_backbones.layers.mamba2 import Mamba2Mixer
from mz_kernels import selective_scan

PUBLISHED = {
    "groupmamba_tiny": 23e6, "groupmamba_small": 34e6,
    "spatialmamba_tiny": 27e6, "spatialmamba_small": 43e6,
    "mambavision_t": 31.8e6, "mambavision_s": 50.1e6,
    "mambaout_tiny": 26.5e6, "mambaout_small": 48.5e6,
}
FAMILIES = ["groupmamba", "spatialmamba", "mambavision", "mambaout"]


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_param_count_matches_paper(name):
    with torch.device("meta"):
        model = create_backbone(name, num_classes=1000)
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - PUBLISHED[name]) / PUBLISHED[name] < 0.05, f"{name}: {n / 1e6:.2f}M"


@pytest.mark.parametrize("family", FAMILIES)
def test_test_variant_features_and_gradients(family):
    torch.manual_seed(0)
    model = create_backbone(f"{family}_test", num_classes=5)
    x = torch.randn(2, 3, 64, 96)
    feats = model.forward_intermediates(x)
    for f, info in zip(feats, model.feature_info):
        assert tuple(f.shape) == (2, info["num_chs"], 64 // info["reduction"], 96 // info["reduction"])
    model(x).square().sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing


def test_group_scan_each_group_follows_its_direction():
    """Group g scans along cross4 direction g: ->, v, <-, ^ (a change at token p reaches only the
    tokens at or after p in that order)."""
    torch.manual_seed(1)
    H, W, G = 3, 4, 4
    scan = GroupScan(8, d_state=2)
    with torch.no_grad():  # identity depthwise conv: no spatial leakage besides the scan itself
        scan.conv2d.weight.zero_()
        scan.conv2d.weight[:, :, 1, 1] = 1.0
    x = torch.randn(1, H, W, 8)
    p = (1, 2)
    x2 = x.clone()
    x2[0, p[0], p[1]] += 1.0
    diff = (scan(x2) - scan(x)).abs().reshape(H, W, G, 2).amax(-1)  # [H, W, G]
    rows = torch.arange(H)[:, None].expand(H, W)
    cols = torch.arange(W)[None, :].expand(H, W)
    raster, colmajor = rows * W + cols, cols * H + rows
    reach = [raster >= raster[p], colmajor >= colmajor[p], raster <= raster[p], colmajor <= colmajor[p]]
    for g in range(G):
        assert (diff[..., g][~reach[g]] == 0).all(), f"group {g} leaked against its direction"
        assert (diff[..., g][reach[g]] > 0).any()


def test_spatial_ssm_zero_fusion_equals_plain_scan():
    """With the fusion convs at zero the mixer reduces to y = C . h + D x of one raster scan."""
    torch.manual_seed(2)
    ssm = SpatialSSM(6, d_state=3)
    x = torch.randn(2, 12, 6)
    dt, Bm, Cm = ssm.x_proj(x).split([ssm.R, 3, 3], dim=-1)
    ref, _ = selective_scan(x, (dt @ ssm.dt_proj.weight.t()).contiguous(), -torch.exp(ssm.A_log),
                            Bm[:, :, None].contiguous(), Cm[:, :, None].contiguous(), D=ssm.D,
                            delta_bias=ssm.dt_proj.bias, backend="ref")
    torch.testing.assert_close(ssm(x, (3, 4)), ref, rtol=1e-4, atol=1e-5)


def test_spatial_ssm_fusion_mixes_states_across_the_grid():
    torch.manual_seed(3)
    ssm = SpatialSSM(4, d_state=1)
    x = torch.randn(1, 25, 4)
    with torch.no_grad():
        ssm.fusion.weight[1].normal_()  # dilation 3 only
    dt, Bm, Cm = ssm.x_proj(x).split([ssm.R, 1, 1], dim=-1)
    h = ssm.states(x, dt @ ssm.dt_proj.weight.t(), Bm)[:, :, 0].transpose(1, 2).reshape(1, 4, 5, 5)
    fused = h + F.conv2d(h, ssm.fusion.weight[1], padding=3, dilation=3, groups=4)
    want = fused.reshape(1, 4, 25).transpose(1, 2) * Cm + ssm.D * x
    torch.testing.assert_close(ssm(x, (5, 5)), want, rtol=1e-4, atol=1e-5)


def test_mambavision_mixer_is_non_causal():
    torch.manual_seed(4)
    mixer = MambaVisionMixer(16, d_state=4)
    x = torch.randn(1, 10, 16)
    x2 = x.clone()
    x2[0, 1] += 1.0  # the "same" conv (k=3) at token 0 reads token 1
    diff = (mixer(x2) - mixer(x)).abs().amax(-1)[0]
    assert diff[0] > 0 and (diff[4:] > 0).all()


@pytest.mark.parametrize("window", [(2, 3), (4, 4)], ids=["2x3", "4x4"])
def test_window_partition_round_trip(window):
    x = torch.randn(2, 5, 8, 12)
    w = window_partition(x, *window)
    assert w.shape == (2 * (8 // window[0]) * (12 // window[1]), window[0] * window[1], 5)
    torch.testing.assert_close(window_reverse(w, *window, 8, 12), x)
    torch.testing.assert_close(w[0, :, 0], x[0, 0, : window[0], : window[1]].reshape(-1))


def test_mambavision_windows_are_independent():
    """A change in one stage-3 window leaves the other windows of that stage untouched."""
    torch.manual_seed(5)
    model = create_backbone("mambavision_test").eval()
    stage = model.stages[2]
    x = torch.randn(1, 32, 6, 6)  # window 3 -> 2 x 2 windows
    x2 = x.clone()
    x2[0, :, 0, 0] += 1.0
    diff = (stage(x2, model.run_block) - stage(x, model.run_block)).abs().amax(1)[0]
    assert diff[:3, :3].max() > 0 and diff[3:].max() == 0 and diff[:, 3:].max() == 0


def test_mambaout_has_no_ssm():
    model = create_backbone("mambaout_test")
    assert not any("A_log" in n or "ssm" in n for n, _ in model.named_parameters())


def _mamba2_reference(m: Mamba2Mixer, x: torch.Tensor) -> torch.Tensor:
    """Sequential Mamba-2 recurrence written out step by step."""
    Bsz, L, _ = x.shape
    Di, G, N, H, P = m.d_inner, m.ngroups, m.d_state, m.nheads, m.headdim
    z, xbc, dt = m.in_proj(x).split([Di, m.conv_dim, H], dim=-1)
    k = m.conv_weight.shape[1]
    xbc = F.silu(F.conv1d(F.pad(xbc.transpose(1, 2), (k - 1, 0)), m.conv_weight[:, None], m.conv_bias, groups=m.conv_dim))
    xs, Bm, Cm = xbc.transpose(1, 2).split([Di, G * N, G * N], dim=-1)
    xs, Bm, Cm = xs.reshape(Bsz, L, H, P), Bm.reshape(Bsz, L, G, N), Cm.reshape(Bsz, L, G, N)
    delta = F.softplus(dt + m.dt_bias)
    A = -torch.exp(m.A_log)
    state = torch.zeros(Bsz, H, P, N)
    ys = []
    for t in range(L):
        g = torch.arange(H) // (H // G)
        state = torch.exp(delta[:, t, :, None, None] * A[:, None, None]) * state + \
            delta[:, t, :, None, None] * xs[:, t, :, :, None] * Bm[:, t, g][:, :, None, :]
        ys.append((state * Cm[:, t, g][:, :, None, :]).sum(-1) + m.D[:, None] * xs[:, t])
    y = torch.stack(ys, 1).reshape(Bsz, L, Di) * F.silu(z)
    yg = y.reshape(Bsz, L, G, -1)
    y = (yg * torch.rsqrt(yg.pow(2).mean(-1, keepdim=True) + m.norm.eps)).reshape(Bsz, L, Di) * m.norm.weight
    return m.out_proj(y)


@pytest.mark.parametrize("ngroups", [1, 2], ids=["G1", "G2"])
def test_mamba2_mixer_matches_recurrence(ngroups):
    torch.manual_seed(6)
    m = Mamba2Mixer(24, d_state=5, headdim=8, ngroups=ngroups, chunk_size=4)
    x = torch.randn(2, 11, 24)
    torch.testing.assert_close(m(x), _mamba2_reference(m, x), rtol=1e-4, atol=1e-5)


def test_mamba2_mixer_bad_arguments():
    with pytest.raises(ValueError, match="headdim"):
        Mamba2Mixer(24, headdim=7)
    with pytest.raises(ValueError, match="ngroups"):
        Mamba2Mixer(24, headdim=8, ngroups=4)
    with pytest.raises(ValueError, match=r"x must be \[B, L, 24\]"):
        Mamba2Mixer(24, headdim=8)(torch.randn(2, 5, 16))
