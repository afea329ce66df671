"""Memory-lean MONAI residual blocks (:mod:`mz_pipelines.medseg.models.lean_blocks`): same outputs and
every gradient as MONAI's blocks (float64, float32, bfloat16 with dtype-scaled tolerances), fewer
bytes saved for backward, in-place inference that leaves inputs alone, and the switches on the
SegMamba-style network, SwinUNETR and ``medseg bench``."""
from __future__ import annotations

import copy

import pytest
import torch
from monai.networks.blocks import UnetrUpBlock
from monai.networks.blocks.dynunet_block import UnetResBlock

from mz_pipelines.medseg.bench import baseline_row, expand_models
from mz_pipelines.medseg.models import build_model
from mz_pipelines.medseg.models.lean_blocks import (
    LeanUnetResBlock,
    LeanUnetrUpBlock,
    _InstanceNormAct,
    norm_act,
    set_block_impl,
    unsupported_reason,
)
from mz_pipelines.medseg.models.segmamba import SegMambaNet

TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 6e-2}


def _pair(block: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    lean = copy.deepcopy(block)
    assert set_block_impl(lean, "lean") >= 1
    return block, lean


def _grads(net: torch.nn.Module, inputs: list[torch.Tensor], weight: torch.Tensor | None = None):
    xs = [x.clone().requires_grad_() for x in inputs]
    y = net(*xs)
    w = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape) if weight is None else weight
    (y * w).sum().backward()
    return y.detach(), [x.grad for x in xs] + [p.grad for p in net.parameters()]


def _close(a: torch.Tensor, b: torch.Tensor, tol: float, scale: float | None = None) -> None:
    """``a`` vs reference ``b`` within ``tol`` of ``scale`` (default: the reference's largest magnitude).
    Biases in front of an instance norm have gradients that are zero up to rounding, so networks pass
    the largest gradient of all as ``scale``: a per-tensor relative test would only compare noise."""
    scale = max(b.abs().max().item(), 1e-6) if scale is None else scale
    assert (a.double() - b.double()).abs().max().item() <= tol * scale, (a - b).abs().max()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    "sd,cin,cout,stride,shape",
    [(3, 5, 3, 1, (5, 6, 7)), (3, 4, 4, 1, (3, 5, 4)), (2, 3, 6, 2, (9, 7)), (2, 6, 6, 1, (11, 5))],
)
def test_res_block_matches_monai(sd: int, cin: int, cout: int, stride: int, shape: tuple, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    ref, lean = _pair(UnetResBlock(sd, cin, cout, kernel_size=3, stride=stride, norm_name="instance").to(dtype))
    assert type(lean) is LeanUnetResBlock and type(ref) is UnetResBlock
    x = torch.randn(2, cin, *shape, dtype=dtype)
    y0, g0 = _grads(ref, [x])
    y1, g1 = _grads(lean, [x])
    _close(y1, y0, TOL[dtype])
    assert all(g is not None for g in g1)
    for a, b in zip(g1, g0):
        _close(a, b, TOL[dtype])


@pytest.mark.parametrize("sd,shape", [(3, (3, 5, 2)), (2, (5, 3))])
def test_up_block_reads_skip_without_concat(sd: int, shape: tuple) -> None:
    torch.manual_seed(1)
    ref, lean = _pair(UnetrUpBlock(sd, 6, 4, kernel_size=3, upsample_kernel_size=2, norm_name="instance", res_block=True).double())
    assert type(lean) is LeanUnetrUpBlock and type(lean.conv_block) is LeanUnetResBlock
    x = torch.randn(2, 6, *shape, dtype=torch.float64)
    skip = torch.randn(2, 4, *[2 * s for s in shape], dtype=torch.float64)
    y0, g0 = _grads(ref, [x, skip])
    y1, g1 = _grads(lean, [x, skip])
    _close(y1, y0, 1e-10)
    for a, b in zip(g1, g0):
        _close(a, b, 1e-10)


def test_bfloat16_against_float64_reference() -> None:
    torch.manual_seed(2)
    ref = UnetResBlock(3, 4, 6, kernel_size=3, stride=1, norm_name="instance").double()
    lean = copy.deepcopy(ref).to(torch.bfloat16)
    set_block_impl(lean, "lean")
    x = torch.randn(1, 4, 6, 5, 7, dtype=torch.float64)
    w = torch.randn(1, 6, 6, 5, 7, dtype=torch.float64)
    y0, g0 = _grads(ref, [x], w)
    y1, g1 = _grads(lean, [x.bfloat16()], w.bfloat16())
    assert y1.dtype == torch.bfloat16
    _close(y1, y0, TOL[torch.bfloat16])
    for a, b in zip(g1, g0):
        _close(a, b, TOL[torch.bfloat16])


@pytest.mark.parametrize("residual,slope", [(False, 0.01), (False, None), (True, 0.2), (True, None)])
def test_norm_act_function_gradcheck(residual: bool, slope: float | None) -> None:
    torch.manual_seed(3)
    x = torch.randn(2, 3, 4, 3, 5, dtype=torch.float64, requires_grad=True)
    r = torch.randn(2, 3, 4, 3, 5, dtype=torch.float64, requires_grad=True) if residual else None
    inputs = (x, r) if residual else (x,)
    assert torch.autograd.gradcheck(lambda *t: _InstanceNormAct.apply(t[0], t[1] if residual else None, 1e-5, slope), inputs)


def test_inference_runs_in_place_on_fresh_maps_only() -> None:
    torch.manual_seed(4)
    for cin in (4, 6):  # identity shortcut (the input is added in place to a fresh map) and 1x1 conv shortcut
        ref, lean = _pair(UnetResBlock(3, cin, 4, kernel_size=3, stride=1, norm_name="instance").eval())
        x = torch.randn(2, cin, 6, 5, 7)
        keep = x.clone()
        with torch.inference_mode():
            y0, y1 = ref(x), lean(x)
        assert torch.equal(x, keep)
        _close(y1, y0, TOL[torch.float32])
    r = torch.randn(1, 2, 3, 3, 3)
    keep = r.clone()
    with torch.no_grad():
        norm_act(torch.randn(1, 2, 3, 3, 3), r, 1e-5, 0.01)
    assert torch.equal(r, keep)


def _saved_bytes(net: torch.nn.Module, *xs: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd keeps for backward (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in net.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        net(*[x.requires_grad_() for x in xs]).sum()
    return sum(seen.values())


def test_lean_blocks_keep_fewer_maps_for_backward() -> None:
    torch.manual_seed(5)
    unit = 2 * 8 * 16**3 * 4  # one [2, 8, 16, 16, 16] float32 map
    ref, lean = _pair(UnetResBlock(3, 8, 8, kernel_size=3, stride=1, norm_name="instance"))
    x = torch.randn(2, 8, 16, 16, 16)
    # MONAI: input, conv1 out, activation, conv2 out, output (5 maps); lean: input, activation, output (3)
    assert _saved_bytes(ref, x.clone()) / unit == pytest.approx(5, abs=0.05)
    assert _saved_bytes(lean, x.clone()) / unit == pytest.approx(3, abs=0.05)
    ref, lean = _pair(UnetrUpBlock(3, 16, 8, kernel_size=3, upsample_kernel_size=2, norm_name="instance", res_block=True))
    up, skip = torch.randn(2, 16, 8, 8, 8), torch.randn(2, 8, 16, 16, 16)
    # MONAI: transp-conv input (1/4), 2x-wide concat (2), conv1 out, act, conv2 out, 1x1 out, output (5) = 7.25;
    # lean: transp-conv input (1/4), upsampled map, skip, act, shortcut, output (5) = 5.25
    assert _saved_bytes(ref, up.clone(), skip.clone()) / unit == pytest.approx(7.25, abs=0.05)
    assert _saved_bytes(lean, up.clone(), skip.clone()) / unit == pytest.approx(5.25, abs=0.05)


def test_set_block_impl_switches_by_class_and_skips_unsupported() -> None:
    blocks = torch.nn.ModuleList([
        UnetResBlock(3, 2, 2, 3, 1, norm_name="instance"),
        UnetResBlock(3, 2, 2, 3, 1, norm_name="batch"),
        UnetResBlock(3, 2, 2, 3, 1, norm_name=("instance", {"affine": True})),
        UnetResBlock(3, 2, 2, 3, 1, norm_name="instance", act_name="relu"),
        UnetResBlock(3, 2, 2, 3, 1, norm_name="instance", dropout=0.1),
    ])
    keys = list(blocks.state_dict())
    assert set_block_impl(blocks, "lean") == 1
    assert [type(b).__name__ for b in blocks] == ["LeanUnetResBlock"] + ["UnetResBlock"] * 4
    assert "instance norm" in unsupported_reason(blocks[1]) and "instance norm" in unsupported_reason(blocks[2])
    assert "not invertible" in unsupported_reason(blocks[3]) and "dropout" in unsupported_reason(blocks[4])
    assert list(blocks.state_dict()) == keys
    assert set_block_impl(blocks, "monai") == 5 and all(type(b) is UnetResBlock for b in blocks)
    with pytest.raises(ValueError, match="block_impl must be one of"):
        set_block_impl(blocks, "fast")


def test_single_voxel_maps_fail_like_instance_norm() -> None:
    lean = _pair(UnetResBlock(3, 2, 2, 3, 1, norm_name="instance"))[1]
    with pytest.raises(ValueError, match="more than 1 spatial element"):
        lean(torch.randn(1, 2, 1, 1, 1, requires_grad=True))


def _net_pair(name: str, **kw) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(6)
    ref = build_model(name, spatial_dims=3, in_channels=1, out_channels=3, preset="tiny", block_impl="monai", **kw)
    lean = build_model(name, spatial_dims=3, in_channels=1, out_channels=3, preset="tiny", block_impl="lean", **kw)
    lean.load_state_dict(ref.state_dict())  # same keys either way: weights load across implementations
    return ref.double(), lean.double()


@pytest.mark.parametrize("name,shape,kw", [
    ("segmamba", (16, 24, 32), {}),
    ("segmamba", (16, 8, 24), {"use_checkpoint": True}),
    ("swinunetr", (64, 32, 32), {}),
])
def test_networks_same_outputs_and_gradients(name: str, shape: tuple, kw: dict) -> None:
    ref, lean = _net_pair(name, **kw)
    assert ref.block_impl == "monai" and lean.block_impl == "lean"
    x = torch.randn(2, 1, *shape, dtype=torch.float64)
    y0, g0 = _grads(ref, [x])
    y1, g1 = _grads(lean, [x])
    _close(y1, y0, 1e-10)
    scale = max(g.abs().max().item() for g in g0)
    for a, b in zip(g1, g0):
        _close(a, b, 1e-10, scale)
    ref.eval(), lean.eval()
    with torch.no_grad():
        _close(lean(x), ref(x), 1e-10)


def test_segmamba_defaults_to_lean_and_validates() -> None:
    net = SegMambaNet(feature_size=(4, 8), depths=(1, 1), hidden_size=8)
    assert net.block_impl == "lean" and isinstance(net.decoder1.layer, LeanUnetResBlock)
    assert all(isinstance(d, LeanUnetrUpBlock) for d in net.decoders)
    net.set_block_impl("monai")
    assert type(net.decoder1.layer) is UnetResBlock
    with pytest.raises(ValueError, match="SegMambaNet: block_impl must be one of"):
        SegMambaNet(feature_size=(4, 8), depths=(1, 1), hidden_size=8, block_impl="fast")
    sw = build_model("swinunetr", spatial_dims=3, in_channels=1, out_channels=2, preset="tiny")
    assert sw.block_impl == "monai" and type(sw.decoder1) is UnetrUpBlock
    with pytest.raises(ValueError, match="SwinUNETR: block_impl must be one of"):
        build_model("swinunetr", spatial_dims=3, in_channels=1, out_channels=2, preset="tiny", block_impl="x")


def test_bench_block_impl_rows_and_like_for_like_baseline() -> None:
    rows = expand_models(["segmamba", "swinunetr", "segresnet"], "full", "on", "lean")
    assert [r[0] for r in rows] == ["segmamba:full+lean+ckpt", "swinunetr:full+lean+ckpt", "segresnet:full"]
    assert rows[0][3] == {"block_impl": "lean", "use_checkpoint": True} and rows[2][3] == {}
    assert [r[0] for r in expand_models(["segmamba"], "tiny", "off")] == ["segmamba:tiny"]
    with pytest.raises(ValueError, match="--block-impl must be one of"):
        expand_models(["segmamba"], "tiny", "off", "fast")
    table = [{"model": m, "size": 64} for m in ("s:f+lean", "b:f+lean", "b:f+lean+ckpt", "c:f")]
    assert baseline_row(table, "b:f", {"model": "s:f+lean", "size": 64})["model"] == "b:f+lean"
    assert baseline_row(table, "b:f", {"model": "c:f", "size": 64})["model"] == "b:f+lean"
    assert baseline_row(table, "b:f", {"model": "s:f+lean", "size": 96}) is None


def test_inference_popping_frees_skip_and_upsampled_map_before_conv2() -> None:
    import weakref

    torch.manual_seed(7)
    ref, lean = _pair(UnetrUpBlock(3, 8, 4, kernel_size=3, upsample_kernel_size=2, norm_name="instance", res_block=True).eval())
    x, skip = torch.randn(1, 8, 3, 4, 5), torch.randn(1, 4, 6, 8, 10)
    with torch.inference_mode():
        expected = ref(x, skip)
    refs: dict[str, weakref.ref] = {"skip": weakref.ref(skip)}
    lean.transp_conv.register_forward_hook(lambda m, a, out: refs.update(up=weakref.ref(out)))
    alive = []
    lean.conv_block.conv2.register_forward_pre_hook(lambda m, a: alive.append([k for k, r in refs.items() if r() is not None]))
    skips = [skip]
    del skip
    with torch.inference_mode():
        y = lean.forward_popping(x, skips)
    assert skips == [] and alive == [[]]  # both maps were gone when the second conv ran
    _close(y, expected, TOL[torch.float32])
    skip = torch.randn(1, 4, 6, 8, 10, requires_grad=True)
    skips = [skip]
    y = lean.forward_popping(x, skips)  # with autograd: the plain module call
    assert skips == [] and y.requires_grad
    _close(y.detach(), ref(x, skip).detach(), TOL[torch.float32])


def test_lean_inference_outputs_are_contiguous() -> None:
    net = SegMambaNet(feature_size=(4, 8), depths=(1, 1), hidden_size=8).eval()
    sw = build_model("swinunetr", spatial_dims=3, in_channels=1, out_channels=2, preset="tiny", block_impl="lean").eval()
    with torch.inference_mode():
        y, ys = net(torch.randn(1, 1, 8, 12, 16)), sw(torch.randn(1, 1, 32, 32, 64))
    assert y.is_contiguous() and y.shape == (1, 2, 8, 12, 16)
    assert ys.is_contiguous() and ys.shape == (1, 2, 32, 32, 64)
