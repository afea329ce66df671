"""3D volume encoders: SegMamba (tri-oriented Mamba) and nnMamba (flip-invariant shared Mamba)."""
from __future__ import annotations

import math

import pytest
import torch

from mz_backbones import create_backbone
from mz_backbones.families.nnmamba import FlipInvariantMamba, NnMambaEncoder
from mz_backbones.families.segmamba import SegMambaEncoder, TSMambaBlock
from mz_backbones.layers.mixer import MambaMixer
from mz_backbones.layers.scans import Unidirectional

TEST_VARIANTS = ["segmamba_enc_test", "nnmamba_enc_test"]


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---- shapes and strides ------------------------------------------------------------------------


@pytest.mark.parametrize("name", TEST_VARIANTS)
@pytest.mark.parametrize(
    "size", [(16, 32, 24), (24, 16, 8), (40, 8, 16)], ids=["16x32x24", "24x16x8-lastD3", "40x8x16-lastD5"]
)
def test_test_variant_shapes_on_odd_volumes(name, size):
    torch.manual_seed(0)
    model = create_backbone(name, in_chans=3, features_only=True).eval()
    assert [f["reduction"] for f in model.feature_info] == [2, 4, 8]
    with torch.no_grad():
        feats = model(_randn(2, 3, *size))
    for f, info in zip(feats, model.feature_info):
        assert tuple(f.shape) == (2, info["num_chs"], *(s // info["reduction"] for s in size))
        assert torch.isfinite(f).all()


@pytest.mark.parametrize("name", ["segmamba_enc_tiny", "nnmamba_enc_tiny"])
def test_published_configs_four_levels_non_cubic(name):
    torch.manual_seed(0)
    model = create_backbone(name, in_chans=4, features_only=True).eval()
    want = {"segmamba_enc_tiny": [48, 96, 192, 384], "nnmamba_enc_tiny": [32, 64, 128, 256]}[name]
    assert [f["num_chs"] for f in model.feature_info] == want
    assert [f["reduction"] for f in model.feature_info] == [2, 4, 8, 16]
    size = (32, 16, 48)
    with torch.no_grad():
        feats = model(_randn(1, 4, *size))
    assert [tuple(f.shape[2:]) for f in feats] == [tuple(s // r for s in size) for r in (2, 4, 8, 16)]
    with pytest.raises(ValueError, match="multiple of"):
        model(_randn(1, 4, 32, 16, 40))  # 40 is not a multiple of the stride 16


# ---- parameter counts --------------------------------------------------------------------------
# Neither medseg.md nor the SegMamba README gives a parameter count (encoder or full model), and
# nnMamba's README gives only the full segmentation network (15.55M on AMOS22). The encoder counts
# below are therefore derived by hand from the released layer lists (ge-xing/SegMamba
# model_segmamba/segmamba.py MambaEncoder; lhaof/nnMamba nnMamba.py nnMambaSeg), written out here
# independently of the model code.


def _conv(cin: int, cout: int, k: int, bias: bool) -> int:
    return cin * cout * k**3 + (cout if bias else 0)


def _mamba(d: int, dirs: int = 1, n: int = 16) -> int:
    """mamba_ssm Mamba(d_model=d, expand=2, d_conv=4); ``dirs`` sets of conv/x_proj/dt_proj/A/D (bimamba v3: 3)."""
    di, r = 2 * d, math.ceil(d / 16)
    per_dir = (di * 4 + di) + di * (r + 2 * n) + (r * di + di) + di * n + di
    return d * 2 * di + di * d + dirs * per_dir  # in_proj + out_proj (no bias) + per-direction parts


def _segmamba_encoder_params(dims, depths, in_chans=1) -> int:
    p = _conv(in_chans, dims[0], 7, True)  # stem k7 s2
    for i, (d, depth) in enumerate(zip(dims, depths)):
        if i:
            p += _conv(dims[i - 1], d, 2, True)  # InstanceNorm (no affine) + conv k2 s2
        p += 2 * _conv(d, d, 3, True) + 2 * _conv(d, d, 1, True)  # GSC: proj, proj2 (3^3), proj3, proj4 (1^3)
        p += depth * (2 * d + _mamba(d, dirs=3))  # LayerNorm + Mamba bimamba_type="v3"
        p += _conv(d, 2 * d, 1, True) + _conv(2 * d, d, 1, True)  # MlpChannel
    return p


def _nnmamba_encoder_params(c=32, blocks=3, in_ch=1) -> int:
    bn = lambda ch: 2 * ch  # noqa: E731
    p = _conv(in_ch, c, 3, True) + bn(c) + _conv(c, c, 3, True) + bn(c)  # DoubleConv stem
    for a, b in ((c, 2 * c), (2 * c, 4 * c), (4 * c, 8 * c)):
        p += _conv(a, b, 3, False) + bn(b) + _conv(b, b, 3, False) + bn(b) + _conv(a, b, 1, False) + bn(b)
        p += (blocks - 1) * (2 * _conv(b, b, 3, False) + 2 * bn(b))
        p += 2 * (_conv(b, b, 1, False) + bn(b)) + _mamba(b)  # one MambaLayer per stage: nin, nin2, mamba
    return p


def _nnmamba_decoder_params(c=32, classes=16) -> int:
    dconv = lambda i, o: _conv(i, o, 3, True) + 2 * o + _conv(o, o, 3, True) + 2 * o  # noqa: E731
    att = lambda d: 2 * d * (d // 16) + d // 16 + d  # noqa: E731
    return dconv(12 * c, 4 * c) + dconv(6 * c, 2 * c) + dconv(3 * c, c) + dconv(c, classes) + att(c) + att(2 * c) + att(4 * c)


def _count(name: str, **kw) -> int:
    with torch.device("meta"):
        model = create_backbone(name, **kw)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "name, expected",
    [
        ("segmamba_enc_tiny", 15_668_688),  # hand-derived, published config, in_chans=1
        ("segmamba_enc_small", 27_633_088),  # same formula, dims 64-128-256-512 (our variant)
        ("nnmamba_enc_tiny", 13_612_064),  # hand-derived, nnMambaSeg(channels=32, blocks=3) encoder
    ],
)
def test_encoder_params_match_hand_derivation(name, expected):
    formula = {
        "segmamba_enc_tiny": _segmamba_encoder_params((48, 96, 192, 384), (2, 2, 2, 2)),
        "segmamba_enc_small": _segmamba_encoder_params((64, 128, 256, 512), (2, 2, 2, 2)),
        "nnmamba_enc_tiny": _nnmamba_encoder_params(32, 3),
    }[name]
    assert formula == expected
    assert _count(name, in_chans=1) == expected


def test_segmamba_params_brats_in_chans():
    assert _count("segmamba_enc_tiny", in_chans=4) == _segmamba_encoder_params((48, 96, 192, 384), (2, 2, 2, 2), 4)


def test_nnmamba_full_network_within_5pct_of_published():
    """README (AMOS22): nnMamba 15.55M params. Our encoder + the released decoder (16 AMOS classes)."""
    total = _count("nnmamba_enc_tiny", in_chans=1) + _nnmamba_decoder_params(32, 16)
    assert abs(total - 15.55e6) / 15.55e6 < 0.05, total


# ---- the inter-slice order follows the actual D ------------------------------------------------


@pytest.mark.parametrize("grid", [(3, 2, 4), (5, 4, 2)], ids=["D3", "D5"])
def test_inter_slice_order_is_segmamba_nslices_with_actual_depth(grid):
    """Direction 2 equals the release's ``chunk(nslices) -> stack -> flatten`` with nslices = D."""
    D, H, W = grid
    block = TSMambaBlock(6, d_state=4)
    x = _randn(2, D * H * W, 6)
    seq = block.mixer.scan.scan(x, grid)
    nslices_order = torch.stack(x.chunk(D, dim=1), dim=2).flatten(1, 2)  # [B, H*W*D, C]
    torch.testing.assert_close(seq[:, :, 2], nslices_order, rtol=0, atol=0)
    torch.testing.assert_close(seq[:, :, 0], x, rtol=0, atol=0)
    torch.testing.assert_close(seq[:, :, 1], x.flip(1), rtol=0, atol=0)


@pytest.mark.parametrize("grid", [(3, 2, 4), (5, 2, 2)], ids=["D3", "D5"])
def test_inter_slice_direction_is_causal_across_slices_first(grid):
    """With the forward/reverse directions silenced, output token (d, p) may only depend on tokens
    (d', p') with p' < p, or p' == p and d' <= d (p = position inside the slice): the slice index runs
    fastest, with the real D."""
    torch.manual_seed(0)
    D, H, W = grid
    L, C = D * H * W, 4
    block = TSMambaBlock(C, d_state=4)
    mixer = block.mixer
    with torch.no_grad():  # zero conv of directions 0 and 1 -> their SSM input is silu(0) = 0 -> output 0
        mixer.conv_weight[: 2 * mixer.d_inner].zero_()
        mixer.conv_bias[: 2 * mixer.d_inner].zero_()
    d_idx, p_idx = torch.arange(L) // (H * W), torch.arange(L) % (H * W)
    pos = p_idx * D + d_idx  # position in the inter-slice sequence
    x = _randn(1, L, C).requires_grad_(True)
    y = mixer(x, grid)
    for t in (0, L // 2 + 1, L - 1):
        (g,) = torch.autograd.grad(y[0, t].sum(), x, retain_graph=True)
        depends = g[0].abs().sum(-1) > 0
        assert torch.equal(depends, pos <= pos[t]), (grid, t)


def test_segmamba_mixer_is_tri_oriented_sum_with_own_params():
    block = TSMambaBlock(8, d_state=4)
    assert block.mixer.scan.num_dirs == 3 and block.mixer.merge == "sum" and not block.mixer.share_params
    assert block.mixer.ssm.A_log.shape[0] == 3 and block.mixer.conv_weight.shape[0] == 3 * block.mixer.d_inner


# ---- nnMamba: flip-invariant shared Mamba --------------------------------------------------------


def test_nnmamba_cai_equals_four_calls_of_one_mamba():
    """(m(x) + flipL m(flipL x) + flipC m(flipC x) + flipLC m(flipLC x)) / 4, m one plain Mamba."""
    torch.manual_seed(0)
    C, grid = 6, (3, 2, 5)
    cai = FlipInvariantMamba(C, d_state=4)
    plain = MambaMixer(C, Unidirectional(), d_state=4, merge="mean")
    plain.load_state_dict(cai.mixer.state_dict())  # shared params have exactly one direction's shapes
    x = _randn(2, math.prod(grid), C)
    m = lambda t: plain(t.contiguous(), grid)  # noqa: E731
    ref = (m(x) + m(x.flip(1)).flip(1) + m(x.flip(2)).flip(2) + m(x.flip(1, 2)).flip(1, 2)) / 4
    torch.testing.assert_close(cai(x, grid), ref, rtol=1e-5, atol=1e-6)


def test_nnmamba_one_mic_per_stage_shared_by_later_blocks():
    model = NnMambaEncoder(dims=(8, 16, 32), depths=(3, 1), d_state=4)
    assert model.stages[1].mic is None  # a single block: no MIC, as make_res_layer(blocks=1)
    calls = []
    model.stages[0].mic.register_forward_hook(lambda *_: calls.append(1))
    model.eval()
    with torch.no_grad():
        model.forward_intermediates(_randn(1, 1, 8, 16, 8))
    assert len(calls) == 2  # blocks 2 and 3 of stage 0 call the same module
    mic_params = sum(p.numel() for p in model.stages[0].mic.parameters())
    deeper = NnMambaEncoder(dims=(8, 16, 32), depths=(4, 1), d_state=4)
    block = sum(p.numel() for p in deeper.stages[0].blocks[-1].parameters())
    own = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert own(deeper) == own(model) + block and mic_params > 0  # one more block, still one MIC


# ---- gradients and arguments ---------------------------------------------------------------------


@pytest.mark.parametrize("name", TEST_VARIANTS)
def test_every_parameter_and_the_input_get_gradients(name):
    torch.manual_seed(0)
    model = create_backbone(name, num_classes=3, in_chans=2).train()
    x = _randn(2, 2, 16, 8, 24).requires_grad_(True)
    feats = model.forward_intermediates(x)
    loss = sum(f.square().mean() for f in feats) + model.forward_head(feats[-1]).square().mean()
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing[:5]
    dead = [n for n, p in model.named_parameters() if p.dim() > 1 and p.grad.abs().sum() == 0]
    assert not dead, dead[:5]
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_gsc_merge_modes_share_weights_but_differ():
    torch.manual_seed(0)
    gate = SegMambaEncoder(dims=(8, 16), depths=(1, 1), d_state=4, gsc_merge="gate").eval()
    add = SegMambaEncoder(dims=(8, 16), depths=(1, 1), d_state=4, gsc_merge="add").eval()
    add.load_state_dict(gate.state_dict())  # same keys and shapes: released weights load in both
    x = _randn(1, 1, 8, 8, 12)
    with torch.no_grad():
        assert not torch.allclose(gate.forward_features(x), add.forward_features(x))


@pytest.mark.parametrize(
    "cls, kwargs, match",
    [
        (SegMambaEncoder, dict(spatial_dims=2), "spatial_dims must be 3"),
        (SegMambaEncoder, dict(dims=(8, 16), depths=(1,)), "same length"),
        (SegMambaEncoder, dict(gsc_merge="mul"), "gsc_merge must be one of"),
        (SegMambaEncoder, dict(dims=(8, 0), depths=(1, 1)), "dims must be a positive int"),
        (NnMambaEncoder, dict(dims=(8, 16, 32), depths=(2, 2, 2)), "len\\(dims\\) - 1 = 2, got 3"),
        (NnMambaEncoder, dict(drop_path_rate=0.1), "drop_path_rate must be 0"),
        (NnMambaEncoder, dict(spatial_dims=1), "spatial_dims must be 3"),
    ],
    ids=["seg-2d", "seg-len", "seg-merge", "seg-dim0", "nn-depths", "nn-droppath", "nn-1d"],
)
def test_bad_arguments(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)
