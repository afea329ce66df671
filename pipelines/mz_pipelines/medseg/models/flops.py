"""FLOPs of a segmentation network's forward pass, selective scans included.

``torch.utils.flop_counter`` counts convolutions and matmuls (2 FLOPs per multiply-add) but not the
selective-scan kernel; :func:`mz_backbones.bench.count_flops` adds each ``SelectiveSSM`` call's
analytic count. This wrapper works for any ``nn.Module`` taking one tensor (2D/3D, our networks and
the MONAI baselines) and names the scan term.
"""
from __future__ import annotations

from torch import Tensor, nn

from mz_backbones.bench import count_flops as _backbone_flops


def count_flops(model: nn.Module, x: Tensor) -> dict[str, int]:
    """FLOPs of ``model(x)`` (one forward, no grad), 2 per multiply-add.

    Args:
        model: a network ``[B, C_in, *S] -> [B, C_out, *S]`` (its mode is left unchanged).
        x: one input batch ``[B, C_in, *S]``.

    Returns:
        ``total``: all FLOPs, selective scans counted analytically; ``scan``: the selective-SSM part
        of ``total`` (0 for networks without SSM layers); ``other``: ``total - scan``;
        ``counted``: FlopCounterMode's raw total (misses the scans).

    Examples:
        >>> from mz_pipelines.medseg.models import build_model
        >>> net = build_model("segmamba", spatial_dims=3, in_channels=1, out_channels=2)
        >>> f = count_flops(net, torch.zeros(1, 1, 32, 32, 32)); f["scan"] > 0
        True
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"count_flops: model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(x, Tensor):
        raise ValueError(f"count_flops: x must be a torch.Tensor [B, C, *S], got {type(x).__name__}")
    raw = _backbone_flops(model, x)
    scan = int(raw["ssm_analytic"])
    total = int(raw["total"])
    return {"total": total, "scan": scan, "other": total - scan, "counted": int(raw["counted"])}
