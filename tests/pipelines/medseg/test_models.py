"""Segmentation networks: registry sweep (shapes, gradients, determinism, input checks, bf16),
full-preset sizes on the meta device, FLOP counts, registry errors and the MHS routes."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from mz_backbones import create_backbone
from mz_backbones.layers import ssm as ssm_module
from mz_pipelines.medseg.models import MODELS, build_model, count_flops, input_multiple
from mz_pipelines.medseg.models.vmunet import route_orders

CASES = [(name, sd) for name, spec in MODELS.items() for sd in spec.spatial_dims]
IDS = [f"{name}-{sd}d" for name, sd in CASES]
SSM_CASES = [(n, sd) for n, sd in CASES if n in ("segmamba", "umamba_bot", "vmunet", "msvmunet")]
HAS_EINOPS = importlib.util.find_spec("einops") is not None
IN_CH, OUT_CH = 2, 3


def _size(m: int, sd: int) -> tuple[int, ...]:
    """A non-cubic size, each axis a multiple of ``m`` (kept small for stride-32 volumes)."""
    if sd == 3:
        return (2 * m, 3 * m, m) if m < 32 else (2 * m, m, m)
    return (3 * m, 2 * m)


def _needs(name: str) -> None:
    if name == "swinunetr" and not HAS_EINOPS:
        pytest.skip("MONAI SwinUNETR needs einops, not installed")


def _build(name: str, sd: int, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(name, spatial_dims=sd, in_channels=IN_CH, out_channels=OUT_CH, **kw)


@pytest.mark.parametrize("name,sd", CASES, ids=IDS)
def test_forward_backward_determinism(name: str, sd: int) -> None:
    _needs(name)
    net = _build(name, sd)
    m = input_multiple(name, sd)
    assert m == net.input_multiple
    x = torch.randn(2, IN_CH, *_size(m, sd), generator=torch.Generator().manual_seed(1))
    y = net(x)
    assert y.shape == (2, OUT_CH, *x.shape[2:])
    assert torch.isfinite(y).all()
    target = torch.randint(0, OUT_CH, (2, *x.shape[2:]), generator=torch.Generator().manual_seed(2))
    torch.nn.functional.cross_entropy(y, target).backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None]
    assert not missing, f"parameters without gradient: {missing[:5]}"
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())
    net.eval()
    with torch.no_grad():
        assert torch.equal(net(x), net(x))


@pytest.mark.parametrize("name,sd", CASES, ids=IDS)
def test_size_not_multiple_of_stride_is_rejected(name: str, sd: int) -> None:
    _needs(name)
    net = _build(name, sd)
    m = input_multiple(name, sd)
    size = list(_size(m, sd))
    size[0] = 2 * m + m // 2  # between two multiples (odd multiple of m/2)
    with pytest.raises(ValueError, match=rf"multiple of {m}\b"):
        net(torch.zeros(1, IN_CH, *size))
    with pytest.raises(ValueError, match="channels"):
        net(torch.zeros(1, IN_CH + 1, *_size(m, sd)))


@pytest.mark.parametrize("name,sd", SSM_CASES, ids=[f"{n}-{sd}d" for n, sd in SSM_CASES])
def test_bf16_autocast_keeps_scan_float32(name: str, sd: int, monkeypatch: pytest.MonkeyPatch) -> None:
    net = _build(name, sd).eval()
    seen: list[torch.dtype] = []
    real = ssm_module.selective_scan

    def spy(u, *args, **kwargs):
        seen.append(u.dtype)
        return real(u, *args, **kwargs)

    monkeypatch.setattr(ssm_module, "selective_scan", spy)
    x = torch.randn(1, IN_CH, *_size(input_multiple(name, sd), sd), generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = net(x)
    assert torch.isfinite(y.float()).all()
    assert seen and set(seen) == {torch.float32}


def _params_meta(name: str, sd: int, **kw) -> int:
    # MONAI's SwinUNETR calls .item() while building, which the meta device does not allow
    with torch.device("cpu" if name == "swinunetr" else "meta"):
        net = build_model(name, spatial_dims=sd, preset="full", **kw)
    return sum(p.numel() for p in net.parameters())


def test_full_presets_sizes_on_meta() -> None:
    # SegMamba: the published encoder (zoo segmamba_enc_tiny) plus the UNETR decoder, ~67M in total
    seg = _params_meta("segmamba", 3, in_channels=4, out_channels=4)
    with torch.device("meta"):
        enc = sum(p.numel() for p in create_backbone("segmamba_enc_tiny", in_chans=4).parameters())
    assert enc < seg and 60e6 < seg < 75e6
    # VM-UNet: its configuration (dims 96, depths 2-2-2-2, decoder 2-2-2-1) is 27.43M for 3 -> 1 channels
    assert abs(_params_meta("vmunet", 2, in_channels=3, out_channels=1) - 27.43e6) < 0.01e6
    # MSVM-UNet's encoder is VMamba-Tiny v2 (zoo vmamba_tiny, ~30M with its classifier)
    with torch.device("meta"):
        vm = sum(p.numel() for p in create_backbone("vmamba_tiny", in_chans=1).parameters())
    assert _params_meta("msvmunet", 2, in_channels=1, out_channels=9) > vm
    for name, sd in CASES:
        if name == "swinunetr" and not HAS_EINOPS:
            continue
        n = _params_meta(name, sd, in_channels=1, out_channels=2)
        with torch.device("cpu" if name == "swinunetr" else "meta"):
            tiny = build_model(name, spatial_dims=sd, in_channels=1, out_channels=2)
        assert n > 10 * sum(p.numel() for p in tiny.parameters()), name


@pytest.mark.skipif(not HAS_EINOPS, reason="MONAI SwinUNETR needs einops")
def test_swinunetr_full_matches_published_size() -> None:
    # nnMamba's AMOS table: SwinUNETR 62.83M (feature_size 48, 1 -> 16 channels)
    assert abs(_params_meta("swinunetr", 3, in_channels=1, out_channels=16) - 62.83e6) / 62.83e6 < 0.02


@pytest.mark.parametrize("name,sd", [("segmamba", 3), ("umamba_bot", 2), ("vmunet", 2), ("msvmunet", 2), ("unet", 3)],
                         ids=["segmamba-3d", "umamba_bot-2d", "vmunet-2d", "msvmunet-2d", "unet-3d"])
def test_count_flops_scan_term(name: str, sd: int) -> None:
    net = _build(name, sd).eval()
    x = torch.zeros(1, IN_CH, *_size(input_multiple(name, sd), sd))
    f = count_flops(net, x)
    assert f["total"] == f["scan"] + f["other"] and f["other"] > 0
    if name == "unet":
        assert f["scan"] == 0 and f["total"] == f["counted"]
    else:
        assert f["scan"] > 0
    # FLOPs grow with the volume: twice the tokens, at least ~twice the FLOPs
    x2 = torch.zeros(1, IN_CH, *(2 * s if i == 0 else s for i, s in enumerate(x.shape[2:])))
    assert count_flops(net, x2)["total"] > 1.9 * f["total"]


def test_count_flops_rejects_non_modules() -> None:
    with pytest.raises(ValueError, match="model must be"):
        count_flops(lambda t: t, torch.zeros(1))


def test_mhs_route_forward_and_orders() -> None:
    for name in ("vmunet", "msvmunet"):
        net = _build(name, 2, route="mhs", heads=4)
        x = torch.randn(1, IN_CH, 64, 96, generator=torch.Generator().manual_seed(4))
        y = net(x)
        assert y.shape == (1, OUT_CH, 64, 96) and torch.isfinite(y).all()
        y.sum().backward()
        assert all(p.grad is not None for p in net.parameters())
    orders = route_orders(3, 5, 6)
    assert orders.shape == (6, 15)
    for row in orders:  # every head visits every token once
        assert torch.equal(row.sort().values, torch.arange(15))
    assert len({tuple(r.tolist()) for r in orders}) == 6  # and the routes differ
    with pytest.raises(ValueError, match="heads must be at most 12"):
        route_orders(3, 5, 13)
    with pytest.raises(ValueError, match="route must be one of"):
        build_model("vmunet", spatial_dims=2, in_channels=1, out_channels=2, route="zigzag")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(name="segmaba", spatial_dims=3), r"unknown model 'segmaba'.*did you mean 'segmamba'"),
        (dict(name="segmamba", spatial_dims=2), r"'segmamba' supports spatial_dims \[3\], got 2"),
        (dict(name="vmunet", spatial_dims=3), r"'vmunet' supports spatial_dims \[2\], got 3"),
        (dict(name="unet", spatial_dims=3, preset="huge"), r"preset must be one of \['full', 'tiny'\].*'huge'"),
        (dict(name="segmamba", spatial_dims=3, feature_sise=16), r"unknown argument 'feature_sise'.*'feature_size'"),
        (dict(name="unet", spatial_dims=3, chanels=(4, 8)), r"invalid arguments for model 'unet'"),
        (dict(name="umamba_bot", spatial_dims=3, features=(8,)), r"features must hold at least 2"),
    ],
    ids=["unknown-name", "segmamba-2d", "vmunet-3d", "unknown-preset", "bad-override", "bad-monai-kwarg", "bad-features"],
)
def test_registry_errors(kwargs: dict, match: str) -> None:
    name = kwargs.pop("name")
    sd = kwargs.pop("spatial_dims")
    with pytest.raises(ValueError, match=match):
        build_model(name, spatial_dims=sd, in_channels=1, out_channels=2, **kwargs)


def test_input_multiple_follows_arguments() -> None:
    assert input_multiple("segmamba", 3, "full") == 16
    assert input_multiple("segmamba", 3, "tiny") == 8
    assert input_multiple("segmamba", 3, "tiny", depths=(1, 1)) == 4
    assert input_multiple("umamba_bot", 2, "full") == 32
    assert input_multiple("unet", 3, "tiny", strides=(2, 3)) == 6
    assert input_multiple("swinunetr", 3) == input_multiple("vmunet", 2) == 32
    # the stride reported is the real one: a two-stage SegMamba takes 12 x 20 x 4 but not 6 x 20 x 4
    net = _build("segmamba", 3, feature_size=(4, 8), depths=(1, 1), hidden_size=8)
    assert net(torch.zeros(1, IN_CH, 12, 20, 4)).shape == (1, OUT_CH, 12, 20, 4)
    with pytest.raises(ValueError, match="multiple of 4"):
        net(torch.zeros(1, IN_CH, 6, 20, 4))
