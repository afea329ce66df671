"""Sliding-window inference: exact against a full-volume forward for pointwise nets, padding, flip TTA."""
from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("monai")
from mz_pipelines.medseg.inference import argmax_mask, flip_axes, sliding_window_predict  # noqa: E402


def _pointwise(spatial_dims: int, c_in: int = 2, c_out: int = 3, seed: int = 0) -> nn.Module:
    """A 1x1(x1) conv: translation-equivariant with no receptive field, so windows cannot change it."""
    torch.manual_seed(seed)
    conv = (nn.Conv2d if spatial_dims == 2 else nn.Conv3d)(c_in, c_out, 1)
    return conv.eval()


def _direct(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.softmax(model(x).float(), dim=1)


@pytest.mark.parametrize(
    "shape, roi, mode",
    [
        ((1, 2, 19, 23, 17), (8, 8, 8), "gaussian"),  # sizes not divisible by the roi
        ((2, 2, 13, 11, 21), (8, 16, 8), "constant"),  # roi larger than one axis: padded
        ((1, 2, 5, 6, 7), (8, 8, 8), "gaussian"),  # smaller than the roi on every axis
    ],
    ids=["3d-odd", "3d-pad-one-axis", "3d-pad-all"],
)
def test_pointwise_net_matches_full_volume_forward(shape, roi, mode):
    torch.manual_seed(1)
    model = _pointwise(3)
    x = torch.randn(shape)
    probs = sliding_window_predict(model, x, roi=roi, overlap=0.5, mode=mode, sw_batch_size=3)
    assert probs.shape == (shape[0], 3, *shape[2:]) and probs.dtype == torch.float32
    torch.testing.assert_close(probs, _direct(model, x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.6], ids=lambda o: f"overlap{o}")
def test_2d_pointwise_net_matches_full_forward(overlap):
    torch.manual_seed(2)
    model = _pointwise(2, c_in=1, c_out=2)
    x = torch.randn(2, 1, 37, 29)
    probs = sliding_window_predict(model, x, roi=(16, 12), overlap=overlap)
    torch.testing.assert_close(probs, _direct(model, x), rtol=1e-5, atol=1e-6)


class _Blur(nn.Module):
    """3x3(x3) conv with zero padding: sees context, so windows change its border responses."""

    def __init__(self, spatial_dims: int, symmetric: bool) -> None:
        super().__init__()
        torch.manual_seed(3)
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        self.conv = conv(1, 2, 3, padding=1)
        if symmetric:  # a kernel equal to all its flips makes the net flip-equivariant
            with torch.no_grad():
                w = self.conv.weight
                for axes in flip_axes(spatial_dims)[1:]:
                    w = w + torch.flip(self.conv.weight, axes)
                self.conv.weight.copy_(w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


@pytest.mark.parametrize("spatial_dims", [2, 3], ids=["2d", "3d"])
def test_flip_tta_equals_no_tta_for_flip_equivariant_net(spatial_dims):
    torch.manual_seed(4)
    shape = (1, 1, 12, 14) if spatial_dims == 2 else (1, 1, 12, 9, 10)
    x = torch.randn(shape)
    roi = tuple(s for s in shape[2:])  # one window: blending is uniform, so only equivariance matters
    model = _Blur(spatial_dims, symmetric=True)
    plain = sliding_window_predict(model, x, roi=roi, tta="none")
    tta = sliding_window_predict(model, x, roi=roi, tta="flip")
    torch.testing.assert_close(tta, plain, rtol=1e-5, atol=1e-6)


def test_flip_tta_with_many_windows_keeps_pointwise_result():
    torch.manual_seed(6)
    model = _pointwise(3)
    x = torch.randn(1, 2, 17, 13, 11)
    tta = sliding_window_predict(model, x, roi=(8, 8, 8), overlap=0.25, tta="flip")
    torch.testing.assert_close(tta, _direct(model, x), rtol=1e-5, atol=1e-6)


def test_flip_tta_averages_unflipped_passes_of_asymmetric_net():
    torch.manual_seed(5)
    x = torch.randn(1, 1, 10, 11, 9)
    model = _Blur(3, symmetric=False)
    tta = sliding_window_predict(model, x, roi=(10, 11, 9), tta="flip")
    manual = torch.stack(
        [torch.flip(_direct(model, torch.flip(x, a) if a else x), a) if a else _direct(model, x) for a in flip_axes(3)]
    ).mean(0)
    torch.testing.assert_close(tta, manual, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(tta, _direct(model, x), atol=1e-3)  # the flips really differ here
    torch.testing.assert_close(tta.sum(1), torch.ones(1, 10, 11, 9))


def test_flip_axes_lists_every_subset():
    assert flip_axes(2) == [(), (2,), (3,), (2, 3)]
    assert len(flip_axes(3)) == 8 and len(set(flip_axes(3))) == 8


def test_restores_training_mode_and_argmax():
    model = _pointwise(2).train()
    x = torch.randn(1, 2, 9, 7)
    probs = sliding_window_predict(model, x, roi=(4, 4))
    assert model.training
    mask = argmax_mask(probs)
    assert mask.shape == (1, 9, 7) and mask.dtype == torch.int64
    assert torch.equal(mask, _direct(model, x).argmax(1))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(roi=(8, 8)), "one size per spatial axis"),
        (dict(roi=(8, 0, 8)), "positive ints"),
        (dict(roi=8), "sequence"),
        (dict(overlap=1.0), "overlap"),
        (dict(overlap=-0.1), "overlap"),
        (dict(mode="mean"), "mode"),
        (dict(tta="mirror"), "tta"),
        (dict(sw_batch_size=0), "sw_batch_size"),
    ],
    ids=["roi-len", "roi-zero", "roi-int", "overlap-1", "overlap-neg", "mode", "tta", "sw-batch"],
)
def test_rejects_bad_arguments(kwargs, match):
    args = dict(roi=(8, 8, 8))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        sliding_window_predict(_pointwise(3), torch.randn(1, 2, 8, 8, 8), **args)


def test_rejects_bad_image_and_single_channel_model():
    with pytest.raises(ValueError, match="image"):
        sliding_window_predict(_pointwise(3), torch.randn(2, 8, 8), roi=(8, 8))
    with pytest.raises(ValueError, match="image"):
        sliding_window_predict(_pointwise(3), torch.zeros(1, 2, 8, 8, 8, dtype=torch.int64), roi=(8, 8, 8))
    with pytest.raises(ValueError, match="C_out >= 2"):
        sliding_window_predict(_pointwise(3, c_out=1), torch.randn(1, 2, 8, 8, 8), roi=(8, 8, 8))
