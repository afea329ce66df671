"""Whole-volume inference: MONAI sliding windows with Gaussian blending and optional flip TTA.

A network sees ``roi``-sized windows only; :func:`sliding_window_predict` tiles any volume with
them (volumes smaller than ``roi`` are zero-padded and the output cropped back), blends the
per-window logits (like MONAI bundles and nnU-Net), takes the softmax and, with ``tta="flip"``,
averages the probabilities over mirrored copies.
"""
from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import nn

from mz_kernels._validate import check_bool, check_choice, check_positive_int, check_tensor

MODES = ("gaussian", "constant")
TTA_MODES = ("none", "flip")
_OP = "sliding_window_predict"


def flip_axes(spatial_dims: int) -> list[tuple[int, ...]]:
    """The flips of flip TTA: every subset of the spatial axes (``2**spatial_dims``, the identity first).

    Axes are tensor dims of a ``[B, C, *S]`` input, i.e. ``2..spatial_dims+1``. In 3D that is 8
    passes (nnU-Net/SegMamba "mirror" TTA on 3 axes), in 2D 4 passes.

    Examples:
        >>> flip_axes(2)
        [(), (2,), (3,), (2, 3)]
    """
    axes = range(2, 2 + spatial_dims)
    return [c for r in range(spatial_dims + 1) for c in itertools.combinations(axes, r)]


def _check_roi(roi: object, spatial_dims: int) -> tuple[int, ...]:
    if isinstance(roi, (str, bytes)) or not isinstance(roi, Sequence):
        raise ValueError(f"{_OP}: roi must be a sequence of {spatial_dims} positive ints, got {roi!r}")
    if len(roi) != spatial_dims:
        raise ValueError(
            f"{_OP}: roi must have one size per spatial axis ({spatial_dims}), got {len(roi)} values {list(roi)}"
        )
    for r in roi:
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"{_OP}: roi must be positive ints, got {list(roi)}")
    return tuple(roi)


def sliding_window_predict(
    model: nn.Module,
    image: torch.Tensor,
    *,
    roi: Sequence[int],
    overlap: float = 0.5,
    mode: str = "gaussian",
    sw_batch_size: int = 1,
    tta: str = "none",
    progress: bool = False,
) -> torch.Tensor:
    """Softmax probabilities of ``model`` over whole volumes by overlapping sliding windows.

    Window logits (float32) are blended, then turned into probabilities by a softmax; flip TTA
    averages those probabilities. The same blending as the exported bundle's ``SlidingWindowInferer``,
    so ``evaluate`` and the bundle give identical masks. The model runs in eval mode under
    ``torch.no_grad`` (its previous train/eval mode is restored afterwards) on ``image``'s device.

    Args:
        model: ``forward(x [b, C, *roi]) -> logits [b, C_out, *roi]`` with ``C_out >= 2``.
        image: ``[B, C, *S]`` float tensor, ``S`` of 2 or 3 dims, any sizes (not required to be
            divisible by the model stride: windows are ``roi``-sized, ``S < roi`` is padded).
        roi: window size, one positive int per spatial axis; must suit the model (divisible by its stride).
        overlap: fraction of window overlap in ``[0, 1)``.
        mode: window blending, ``"gaussian"`` (centre-weighted, sigma 1/8 of the window) or ``"constant"``.
        sw_batch_size: windows per forward pass.
        tta: ``"none"`` or ``"flip"``: average the probabilities of all ``2**n`` flips of the
            ``n`` spatial axes (see :func:`flip_axes`), each flipped back before averaging.
        progress: show a progress bar per pass.

    Returns:
        ``[B, C_out, *S]`` float32 probabilities (sum to 1 over ``C_out``), on ``image``'s device.

    Examples:
        >>> probs = sliding_window_predict(net, x, roi=(32, 32, 32), overlap=0.5, tta="flip")
        >>> mask = argmax_mask(probs)  # [B, *S]
    """
    from monai.data import MetaTensor
    from monai.inferers import sliding_window_inference

    if not isinstance(model, nn.Module):
        raise ValueError(f"{_OP}: model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(image, torch.Tensor) or image.dim() not in (4, 5):
        got = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"{_OP}: image must be a tensor [B, C, *S] with 2 or 3 spatial dims, got {got}")
    spatial_dims = image.dim() - 2
    check_tensor(_OP, "image", image, dims="B C H W" if spatial_dims == 2 else "B C D H W", contiguous=False)
    roi_t = _check_roi(roi, spatial_dims)
    if isinstance(overlap, bool) or not isinstance(overlap, (int, float)) or not 0.0 <= overlap < 1.0:
        raise ValueError(f"{_OP}: overlap must be a number in [0, 1), got {overlap!r}")
    check_choice(_OP, "mode", mode, MODES)
    check_positive_int(_OP, "sw_batch_size", sw_batch_size)
    check_choice(_OP, "tta", tta, TTA_MODES)
    check_bool(_OP, "progress", progress)
    if isinstance(image, MetaTensor):
        image = image.as_tensor()  # blend plain tensors; geometry is the caller's business

    def predictor(x: torch.Tensor) -> torch.Tensor:
        logits = model(x)
        if not isinstance(logits, torch.Tensor) or logits.dim() != x.dim() or logits.shape[2:] != x.shape[2:]:
            got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise ValueError(f"{_OP}: model must map [b, C, *roi] {tuple(x.shape)} to [b, C_out, *roi], got {got}")
        if logits.shape[1] < 2:
            raise ValueError(f"{_OP}: model must return C_out >= 2 channels (background + classes), got {logits.shape[1]}")
        return logits.float()

    flips = flip_axes(spatial_dims) if tta == "flip" else [()]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            total: torch.Tensor | None = None
            for axes in flips:
                x = torch.flip(image, axes) if axes else image
                logits = sliding_window_inference(
                    x, roi_t, sw_batch_size, predictor, overlap=float(overlap), mode=mode, progress=progress
                )
                assert isinstance(logits, torch.Tensor)
                probs = torch.softmax(logits, dim=1)
                if axes:
                    probs = torch.flip(probs, axes)
                total = probs if total is None else total + probs
    finally:
        model.train(was_training)
    assert total is not None
    return (total / len(flips)).float()


def argmax_mask(probs: torch.Tensor) -> torch.Tensor:
    """Class index per voxel: ``probs [B, C_out, *S]`` -> int64 mask ``[B, *S]``."""
    if not isinstance(probs, torch.Tensor) or probs.dim() < 3:
        got = tuple(probs.shape) if isinstance(probs, torch.Tensor) else type(probs).__name__
        raise ValueError(f"argmax_mask: probs must be a tensor [B, C_out, *S], got {got}")
    return probs.argmax(dim=1)
