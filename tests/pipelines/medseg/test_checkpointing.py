"""Activation checkpointing (``use_checkpoint``) of the SegMamba-style network and SwinUNETR, the
skip-dropping decoder loop, and how ``medseg bench`` lays out checkpointed rows."""
from __future__ import annotations

import copy

import pytest
import torch

from mz_pipelines.medseg.bench import baseline_row, expand_models, supports_checkpoint
from mz_pipelines.medseg.models import build_model
from mz_pipelines.medseg.models.segmamba import SegMambaNet


def _tiny(**kw) -> SegMambaNet:
    torch.manual_seed(0)
    return SegMambaNet(in_channels=2, out_channels=3, feature_size=(4, 8, 8), depths=(1, 2, 1), hidden_size=16,
                       d_state=3, expand=1.5, **kw)


def _monai_forward(net: SegMambaNet, x: torch.Tensor) -> torch.Tensor:
    """The release's forward with MONAI's own ``UnetrUpBlock.forward`` (the reference for the
    skip-dropping loop)."""
    feats = net.encoder.forward_stages(x)
    skips = [net.encoder1(x)] + [enc(f) for enc, f in zip(net.encoders, feats[:-1])]
    y = net.bottleneck(feats[-1])
    for dec, skip in zip(net.decoders, reversed(skips)):
        y = dec(y, skip)
    return net.out(net.decoder1(y))


def test_decoder_loop_equals_monai_blocks() -> None:
    net = _tiny(block_impl="monai").double().eval()
    x = torch.randn(1, 2, 16, 24, 8, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(net(x), _monai_forward(net, x), rtol=0, atol=0)


def test_use_checkpoint_same_gradients() -> None:
    ref = _tiny().double().train()
    ck = copy.deepcopy(ref)
    ck.set_grad_checkpointing(True)
    x = torch.randn(2, 2, 16, 8, 24, dtype=torch.float64)
    grads = []
    for net in (ref, ck):
        xi = x.clone().requires_grad_()
        y = net(xi)
        (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape)).sum().backward()
        grads.append([xi.grad] + [p.grad for p in net.parameters()])
    assert all(g is not None for g in grads[1])
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12)


def test_use_checkpoint_through_registry_and_validation() -> None:
    net = build_model("segmamba", spatial_dims=3, in_channels=1, out_channels=2, preset="tiny", use_checkpoint=True)
    assert net.use_checkpoint and net.encoder.grad_checkpointing
    sw = build_model("swinunetr", spatial_dims=3, in_channels=1, out_channels=2, preset="tiny", use_checkpoint=True)
    assert sw.swinViT.layers1[0].blocks[0].use_checkpoint
    with pytest.raises(ValueError, match="use_checkpoint must be True or False"):
        SegMambaNet(feature_size=(4, 8), depths=(1, 1), hidden_size=8, use_checkpoint="yes")
    with pytest.raises(ValueError, match="invalid arguments for model 'unet'"):
        build_model("unet", spatial_dims=3, in_channels=1, out_channels=2, use_checkpoint=True)


def test_bench_model_rows_and_like_for_like_baseline() -> None:
    assert supports_checkpoint("segmamba") and supports_checkpoint("swinunetr") and not supports_checkpoint("segresnet")
    rows = expand_models(["segmamba", "swinunetr:tiny", "segresnet"], "full", "both")
    assert [r[0] for r in rows] == ["segmamba:full", "segmamba:full+ckpt", "swinunetr:tiny", "swinunetr:tiny+ckpt",
                                    "segresnet:full"]
    assert [r[3].get("use_checkpoint", False) for r in rows] == [False, True, False, True, False]
    assert [r[0] for r in expand_models(["segmamba", "segresnet"], "tiny", "on")] == ["segmamba:tiny+ckpt", "segresnet:tiny"]
    assert [r[0] for r in expand_models(["segmamba"], "tiny", "off")] == ["segmamba:tiny"]
    with pytest.raises(ValueError, match="--use-checkpoint"):
        expand_models(["segmamba"], "tiny", "yes")
    table = [{"model": m, "size": s} for m in ("s:f", "s:f+ckpt", "b:f", "b:f+ckpt") for s in (64, 96)]
    pick = lambda m, s, base="b:f": baseline_row(table, base, {"model": m, "size": s})  # noqa: E731
    assert pick("s:f", 96) == {"model": "b:f", "size": 96}
    assert pick("s:f+ckpt", 64) == {"model": "b:f+ckpt", "size": 64}
    only_plain = [r for r in table if r["model"] != "b:f+ckpt"]
    assert baseline_row(only_plain, "b:f", {"model": "s:f+ckpt", "size": 64}) == {"model": "b:f", "size": 64}
    assert baseline_row(table, "b:f", {"model": "s:f", "size": 128}) is None


def test_config_key_reaches_the_model() -> None:
    import dataclasses

    from mz_pipelines.medseg.config import MedsegConfig
    from mz_pipelines.medseg.task import build_model as build_from_config
    from mz_pipelines.runtime.errors import UserError

    cfg = MedsegConfig()
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, roi=(32, 32, 32)))
    model = dataclasses.replace(cfg.model, name="segmamba", in_channels=1, out_channels=2, use_checkpoint=True)
    assert build_from_config(dataclasses.replace(cfg, model=model)).use_checkpoint
    for impl in ("lean", "monai"):
        built = build_from_config(dataclasses.replace(cfg, model=dataclasses.replace(model, block_impl=impl)))
        assert built.block_impl == impl
    with pytest.raises(ValueError, match="model.block_impl must be"):
        dataclasses.replace(model, block_impl="fast")
    with pytest.raises(UserError, match="invalid arguments for model 'unet'"):
        build_from_config(dataclasses.replace(cfg, model=dataclasses.replace(model, name="unet")))
