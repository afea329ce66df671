"""One sweep over every registered ``*_test`` variant: the contract every zoo backbone keeps."""
from __future__ import annotations

import pytest
import torch

from mz_backbones import Backbone, create_backbone, list_backbones

TEST_VARIANTS = list_backbones("*_test")


def _input(model: Backbone, scale: tuple[int, ...], batch: int = 2) -> torch.Tensor:
    """Smallest comfortable input: a multiple of the model's stride along each dim, times ``scale``."""
    sizes = [m * s for m, s in zip(model.input_multiple, scale)]
    return torch.randn(batch, model.in_chans, *sizes, generator=torch.Generator().manual_seed(0))


def _scales(model: Backbone) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """A square-ish and a non-square (odd multiple) input shape for the model's spatial dims."""
    d = model.spatial_dims
    base = {1: (4,), 2: (2, 2), 3: (1, 2, 2)}[d]
    odd = {1: (3,), 2: (3, 1), 3: (2, 1, 3)}[d]
    return base, odd


def test_registry_has_families():
    assert len(TEST_VARIANTS) >= 1, "no *_test variants registered"
    for name in TEST_VARIANTS:
        assert list_backbones(name.removesuffix("_test") + "*"), name


@pytest.mark.parametrize("name", TEST_VARIANTS)
def test_contract(name):
    torch.manual_seed(0)
    model = create_backbone(name, num_classes=5)
    assert isinstance(model, Backbone)
    base, odd = _scales(model)
    for scale in (base, odd):
        x = _input(model, scale)
        feats = model.forward_intermediates(x)
        assert len(feats) == len(model.feature_info) >= 1
        for f, info in zip(feats, model.feature_info):
            red = info["reduction"]  # an int, or one stride per dim (video: tubelet x 16 x 16)
            red = (red,) * (x.dim() - 2) if isinstance(red, int) else tuple(red)
            expect = [s // r for s, r in zip(x.shape[2:], red)]
            assert list(f.shape) == [x.shape[0], info["num_chs"], *expect], (name, info, tuple(f.shape))
            assert torch.isfinite(f).all()
    # classifier and feature outputs: every parameter gets a gradient (some models, e.g. SegMamba,
    # have per-level output layers that only feed the feature pyramid)
    model.train()
    x = _input(model, odd)
    out = model(x)
    assert out.shape == (2, 5) and torch.isfinite(out).all()
    loss = out.square().mean() + sum(f.square().mean() for f in model.forward_intermediates(x))
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"{name}: parameters without gradient: {missing[:5]}"
    # eval is deterministic
    model.eval()
    x = _input(model, base)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
    assert model.no_weight_decay() <= {n for n, _ in model.named_parameters()}


@pytest.mark.parametrize("name", TEST_VARIANTS)
def test_features_only_and_checkpointing(name):
    torch.manual_seed(0)
    model = create_backbone(name, features_only=True, out_indices=(-1, 0))
    base, _ = _scales(model)
    x = _input(model, base)
    feats = model(x)
    assert [f.shape[1] for f in feats] == [model.feature_info[-1]["num_chs"], model.feature_info[0]["num_chs"]]
    model.eval()
    with torch.no_grad():
        ref = model(x)
    model.set_grad_checkpointing(True)
    model.train()
    for m in model.modules():  # compare without dropout/drop-path randomness
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    model.eval()
    with torch.no_grad():
        again = model(x)
    for a, b in zip(again, ref):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", TEST_VARIANTS)
def test_bad_input(name):
    model = create_backbone(name)
    base, _ = _scales(model)
    x = _input(model, base, batch=1)
    wrong_c = torch.randn(1, model.in_chans + 1, *x.shape[2:])
    with pytest.raises(ValueError, match=f"must have {model.in_chans} channels"):
        model(wrong_c)
    if max(model.input_multiple) > 1:
        sizes = [s + (1 if m > 1 else 0) for s, m in zip(x.shape[2:], model.input_multiple)]
        with pytest.raises(ValueError, match="multiple of"):
            model(torch.randn(1, model.in_chans, *sizes))
    with pytest.raises(ValueError, match="dims"):
        model(x[0])


def test_unknown_name_suggests():
    if not TEST_VARIANTS:
        pytest.skip("empty registry")
    name = TEST_VARIANTS[0]
    typo = name[:-1] + ("x" if name[-1] != "x" else "y")
    with pytest.raises(ValueError, match=f"unknown backbone '{typo}'; did you mean '{name}'"):
        create_backbone(typo)


def test_pretrained_round_trip(tmp_path):
    if not TEST_VARIANTS:
        pytest.skip("empty registry")
    name = TEST_VARIANTS[0]
    torch.manual_seed(1)
    src = create_backbone(name, num_classes=3)
    path = tmp_path / "w.pt"
    torch.save({"state_dict": src.state_dict()}, path)
    dst = create_backbone(name, num_classes=3, pretrained=path)
    for (k, a), (_, b) in zip(src.state_dict().items(), dst.state_dict().items()):
        assert torch.equal(a, b), k
    # a classifier of another size is skipped, the rest is loaded
    other = create_backbone(name, num_classes=7, pretrained=path)
    assert other.head.out_features == 7
    with pytest.raises(ValueError, match="does not exist"):
        create_backbone(name, pretrained=tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        create_backbone(name, pretrained=tmp_path / "junk.pt")


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted({n.rsplit("_", 1)[0] for n in TEST_VARIANTS}))
def test_torch_compile_one_per_family(family):
    torch.manual_seed(0)
    model = create_backbone(f"{family}_test", num_classes=4).eval()
    base, _ = _scales(model)
    x = _input(model, base, batch=1)
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model, backend="aot_eager")(x)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
