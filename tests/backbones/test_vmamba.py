"""VMamba family: SS2D against a direction-by-direction reference, published sizes, and the mapping of
official checkpoints (synthetic state dicts in the official v0/v2 key layouts and shapes)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mz_backbones import create_backbone
from mz_backbones.families.vmamba import VMamba
from mz_backbones.layers.scans import Cross2D, TriOriented3D
from mz_backbones.layers.ss2d import SS2D
from mz_kernels import selective_scan


# ---- SS2D -----------------------------------------------------------------------------------------
def _reference_ss2d(m: SS2D, x: torch.Tensor) -> torch.Tensor:
    """VMamba SS2D written out per direction: flatten rows / columns, flip, scan each, undo, sum."""
    B, H, W, _ = x.shape
    L, C = H * W, m.d_inner
    ssm = m.ssm
    R, N = ssm.dt_rank, ssm.d_state
    xz = F.linear(x, m.in_proj.weight)
    xs, z = xz.chunk(2, dim=-1) if m.gate else (xz, None)
    img = F.silu(F.conv2d(xs.permute(0, 3, 1, 2), m.conv2d.weight, m.conv2d.bias, padding=1, groups=C))
    rows, cols = img.flatten(2), img.transpose(2, 3).flatten(2)  # [B, C, L]
    ys = []
    for k, seq in enumerate([rows, cols, rows.flip(-1), cols.flip(-1)]):
        u = seq.transpose(1, 2)
        dt, Bm, Cm = F.linear(u, ssm.x_proj_weight[k]).split([R, N, N], dim=-1)
        y, _ = selective_scan(
            u.contiguous(), F.linear(dt, ssm.dt_proj_weight[k]), -torch.exp(ssm.A_log[k]),
            Bm[:, :, None].contiguous(), Cm[:, :, None].contiguous(),
            D=ssm.D[k], delta_bias=ssm.dt_bias[k], delta_softplus=True, backend="ref",
        )
        ys.append(y)
    from_cols = lambda y: y.reshape(B, W, H, C).transpose(1, 2).reshape(B, L, C)  # noqa: E731
    y = ys[0] + from_cols(ys[1]) + ys[2].flip(1) + from_cols(ys[3].flip(1))
    y = m.out_norm(y)
    if z is not None:
        y = y * F.silu(z.reshape(B, L, C))
    return m.out_proj(y).reshape(B, H, W, -1)


@pytest.mark.parametrize(
    "gate,d_state,ssm_ratio", [(True, 16, 2.0), (False, 1, 1.0), (False, 3, 1.5)], ids=["v0-gated-N16", "v2-noz-N1", "noz-N3-r1.5"]
)
def test_ss2d_matches_per_direction_reference(gate, d_state, ssm_ratio):
    torch.manual_seed(0)
    m = SS2D(12, d_state=d_state, ssm_ratio=ssm_ratio, gate=gate)
    with torch.no_grad():  # non-trivial parameters, so every term of the reference matters
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(2, 5, 7, 12)
    out = m(x)
    ref = _reference_ss2d(m, x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    assert m.in_proj.out_features == m.d_inner * (2 if gate else 1)


def test_ss2d_cross_scan_sees_the_whole_grid():
    torch.manual_seed(0)
    m = SS2D(8, d_conv=0)
    x = torch.randn(1, 5, 7, 8, requires_grad=True)
    m(x)[0, 2, 3].sum().backward()
    assert (x.grad.abs().sum(-1) > 0).all(), "the 4-way cross scan should reach every token"


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(gate="noz"), "gate"),
        (dict(scan=TriOriented3D()), "scan"),
        (dict(scan="cross4"), "scan"),
        (dict(d_conv=2), "d_conv"),
        (dict(ssm_ratio=0.01), "ssm_ratio"),
        (dict(d_state=0), "d_state"),
    ],
    ids=["gate-string", "scan-3d", "scan-string", "d_conv-even", "ssm_ratio-tiny", "d_state-0"],
)
def test_ss2d_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SS2D(16, **kwargs)


def test_ss2d_rejects_channel_first_input():
    with pytest.raises(ValueError, match="channel-last"):
        SS2D(8)(torch.randn(1, 8, 5))


# ---- published configurations ------------------------------------------------------------------
@pytest.mark.parametrize(
    "name,millions",
    [("vanilla_vmamba_tiny", 23), ("vanilla_vmamba_small", 44), ("vmamba_tiny_s1l8", 30), ("vmamba_tiny", 30),
     ("vmamba_small_s2l15", 50)],
)
def test_parameter_count_matches_paper(name, millions):
    with torch.device("meta"):
        model = create_backbone(name, num_classes=1000)
    n = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(n - millions) / millions < 0.05, f"{name}: {n:.2f}M vs {millions}M"


def test_vmamba_tiny_is_the_s1l8_configuration():
    with torch.device("meta"):
        a, b = create_backbone("vmamba_tiny"), create_backbone("vmamba_tiny_s1l8")
    assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}
    blk = a.layers[2].blocks[0].op
    assert (blk.ssm.d_state, blk.d_inner, blk.gate, blk.conv2d.bias) == (1, 384, False, None)
    assert len(a.layers[2].blocks) == 8 and a.layers[0].blocks[0].mlp is not None


def test_vanilla_layout_features_on_odd_grid():
    torch.manual_seed(0)
    model = create_backbone("vanilla_vmamba_tiny", depths=(1, 1, 1, 1), dims=8, drop_path_rate=0.0).eval()
    assert model.layers[0].blocks[0].mlp is None and model.layers[0].blocks[0].op.gate
    feats = model.forward_intermediates(torch.randn(1, 3, 96, 160))
    assert [tuple(f.shape) for f in feats] == [(1, 8, 24, 40), (1, 16, 12, 20), (1, 32, 6, 10), (1, 64, 3, 5)]
    assert [i["reduction"] for i in model.feature_info] == [4, 8, 16, 32]
    # each level is layer-normed over channels
    for f in feats:
        torch.testing.assert_close(f.mean(1), torch.zeros_like(f.mean(1)), atol=1e-5, rtol=0)


def test_bad_model_arguments():
    with pytest.raises(ValueError, match="stem"):
        VMamba(stem="conv3")
    with pytest.raises(ValueError, match="depths"):
        VMamba(depths=(2, 2, 9))
    with pytest.raises(ValueError, match="scans"):
        VMamba(depths=(1, 1, 1, 1), dims=8, scans=[Cross2D()])


# ---- official checkpoints --------------------------------------------------------------------------
def _official_state_dict(depths, dims, *, v2: bool, d_state: int, ssm_ratio: float, num_classes: int, seed: int = 0):
    """Random tensors under the official VMamba key names and shapes (``VSSM`` classification model)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    sd: dict[str, torch.Tensor] = {}
    if v2:
        h = dims[0] // 2
        sd |= {"patch_embed.0.weight": r(h, 3, 3, 3), "patch_embed.0.bias": r(h), "patch_embed.2.weight": r(h),
               "patch_embed.2.bias": r(h), "patch_embed.5.weight": r(dims[0], h, 3, 3), "patch_embed.5.bias": r(dims[0]),
               "patch_embed.7.weight": r(dims[0]), "patch_embed.7.bias": r(dims[0])}
    else:
        sd |= {"patch_embed.0.weight": r(dims[0], 3, 4, 4), "patch_embed.0.bias": r(dims[0]),
               "patch_embed.2.weight": r(dims[0]), "patch_embed.2.bias": r(dims[0])}
    for i, (depth, d) in enumerate(zip(depths, dims)):
        C, R, N, K = int(ssm_ratio * d), math.ceil(d / 16), d_state, 4
        for j in range(depth):
            p = f"layers.{i}.blocks.{j}."
            sd |= {p + "norm.weight": r(d), p + "norm.bias": r(d)}
            in_w = r(C, d, 1, 1) if v2 else r(2 * C, d)  # v2 stores Linear2d as a 1x1 conv
            sd |= {p + "op.in_proj.weight": in_w, p + "op.conv2d.weight": r(C, 1, 3, 3),
                   p + "op.x_proj_weight": r(K, R + 2 * N, C), p + "op.dt_projs_weight": r(K, C, R),
                   p + "op.dt_projs_bias": r(K, C), p + "op.A_logs": r(K * C, N), p + "op.Ds": r(K * C),
                   p + "op.out_norm.weight": r(C), p + "op.out_norm.bias": r(C), p + "op.out_proj.weight": r(d, C)}
            if not v2:
                sd[p + "op.conv2d.bias"] = r(C)
            else:
                sd |= {p + "norm2.weight": r(d), p + "norm2.bias": r(d), p + "mlp.fc1.weight": r(4 * d, d),
                       p + "mlp.fc1.bias": r(4 * d), p + "mlp.fc2.weight": r(d, 4 * d), p + "mlp.fc2.bias": r(d)}
        if i < 3:
            p = f"layers.{i}.downsample."
            if v2:
                sd |= {p + "1.weight": r(dims[i + 1], d, 3, 3), p + "1.bias": r(dims[i + 1]),
                       p + "3.weight": r(dims[i + 1]), p + "3.bias": r(dims[i + 1])}
            else:
                sd |= {p + "norm.weight": r(4 * d), p + "norm.bias": r(4 * d), p + "reduction.weight": r(dims[i + 1], 4 * d)}
    sd |= {"classifier.norm.weight": r(dims[-1]), "classifier.norm.bias": r(dims[-1]),
           "classifier.head.weight": r(num_classes, dims[-1]), "classifier.head.bias": r(num_classes)}
    return sd


def test_official_v2_checkpoint_loads(tmp_path):
    depths, dims = (1, 1, 2, 1), (16, 32, 64, 128)
    sd = _official_state_dict(depths, dims, v2=True, d_state=1, ssm_ratio=1.0, num_classes=7)
    path = tmp_path / "vssm_tiny_v2.pth"
    torch.save({"model": sd, "epoch": 299}, path)
    model = create_backbone("vmamba_test", pretrained=path, num_classes=7)
    op = model.layers[2].blocks[1].op
    pre = "layers.2.blocks.1.op."
    assert torch.equal(op.ssm.A_log, sd[pre + "A_logs"].view(4, 64, 1))
    assert torch.equal(op.ssm.D, sd[pre + "Ds"].view(4, 64))
    assert torch.equal(op.ssm.x_proj_weight, sd[pre + "x_proj_weight"])
    assert torch.equal(op.ssm.dt_proj_weight, sd[pre + "dt_projs_weight"])
    assert torch.equal(op.ssm.dt_bias, sd[pre + "dt_projs_bias"])
    assert torch.equal(op.in_proj.weight, sd[pre + "in_proj.weight"].view(64, 64))
    assert torch.equal(model.layers[2].blocks[1].mlp.fc2.weight, sd["layers.2.blocks.1.mlp.fc2.weight"])
    assert torch.equal(model.patch_embed.conv2.weight, sd["patch_embed.5.weight"])
    assert torch.equal(model.patch_embed.norm1.bias, sd["patch_embed.2.bias"])
    assert torch.equal(model.layers[1].downsample.conv.weight, sd["layers.1.downsample.1.weight"])
    assert torch.equal(model.layers[1].downsample.norm.weight, sd["layers.1.downsample.3.weight"])
    assert torch.equal(model.out_norms[3].weight, sd["classifier.norm.weight"])
    assert torch.equal(model.head.weight, sd["classifier.head.weight"])
    out = model(torch.randn(1, 3, 64, 96))
    assert out.shape == (1, 7) and torch.isfinite(out).all()


def test_official_v0_checkpoint_loads_with_new_head(tmp_path):
    depths, dims = (1, 2, 1, 1), (8, 16, 32, 64)
    sd = _official_state_dict(depths, dims, v2=False, d_state=16, ssm_ratio=2.0, num_classes=1000, seed=1)
    path = tmp_path / "vssm_tiny_v0.pth"
    torch.save({"model": sd}, path)
    model = create_backbone("vanilla_vmamba_tiny", depths=depths, dims=8, pretrained=path, num_classes=3)
    op = model.layers[1].blocks[1].op
    assert torch.equal(op.ssm.A_log, sd["layers.1.blocks.1.op.A_logs"].view(4, 32, 16))
    assert torch.equal(op.in_proj.weight, sd["layers.1.blocks.1.op.in_proj.weight"])
    assert torch.equal(op.conv2d.bias, sd["layers.1.blocks.1.op.conv2d.bias"])
    assert torch.equal(model.patch_embed.proj.weight, sd["patch_embed.0.weight"])
    assert torch.equal(model.layers[0].downsample.reduction.weight, sd["layers.0.downsample.reduction.weight"])
    assert model.head.weight.shape == (3, 64)  # the 1000-class head was skipped


def test_backbone_vssm_outnorms_need_affine_level_norms(tmp_path):
    depths, dims = (1, 1, 2, 1), (16, 32, 64, 128)
    sd = _official_state_dict(depths, dims, v2=True, d_state=1, ssm_ratio=1.0, num_classes=1)
    sd = {k: v for k, v in sd.items() if not k.startswith("classifier.")}
    g = torch.Generator().manual_seed(3)
    for i, d in enumerate(dims):
        sd[f"outnorm{i}.weight"], sd[f"outnorm{i}.bias"] = torch.randn(d, generator=g), torch.randn(d, generator=g)
    path = tmp_path / "backbone_vssm.pth"
    torch.save({"state_dict": sd}, path)
    with pytest.raises(ValueError, match="level_norm_affine"):
        create_backbone("vmamba_test", pretrained=path)
    model = create_backbone("vmamba_test", pretrained=path, level_norm_affine=True, features_only=True)
    for i in range(4):
        assert torch.equal(model.out_norms[i].bias, sd[f"outnorm{i}.bias"])


def test_own_state_dict_round_trips(tmp_path):
    torch.manual_seed(0)
    a = create_backbone("vmamba_test", num_classes=4)
    torch.save(a.state_dict(), tmp_path / "own.pth")
    b = create_backbone("vmamba_test", num_classes=4, pretrained=tmp_path / "own.pth")
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
