"""Optimiser and learning-rate schedule: AdamW without weight decay on biases, norms and SSM
parameters; linear warm-up, then cosine, linear or constant decay to ``min_lr``."""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from .schema import TrainConfig

SCHEDULES = ("cosine", "linear", "constant")


def lr_factor(step: int, *, total: int, warmup: int = 0, kind: str = "cosine", min_ratio: float = 0.0) -> float:
    """Multiplier of the peak learning rate for optimiser step ``step`` (0-based).

    Warm-up ramps linearly ``1/warmup, 2/warmup, ..., 1``; after it the factor decays from 1 to
    ``min_ratio`` at ``step = total`` (cosine or linear) or stays at 1 (constant).

    Examples:
        >>> lr_factor(0, total=100, warmup=10)
        0.1
        >>> round(lr_factor(55, total=100, warmup=10), 3)
        0.5
    """
    if kind not in SCHEDULES:
        raise ValueError(f"lr_factor: kind must be one of {list(SCHEDULES)}, got {kind!r}")
    if step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    decay = 0.5 * (1.0 + math.cos(math.pi * progress)) if kind == "cosine" else 1.0 - progress
    return min_ratio + (1.0 - min_ratio) * decay


def build_scheduler(optimizer: Optimizer, cfg: TrainConfig) -> LambdaLR:
    """Per-step scheduler for ``cfg.steps`` steps of ``cfg.schedule`` with ``cfg.warmup_steps`` warm-up.

    The factor is a plain function, so ``state_dict()`` holds only counters: a resumed run follows
    the schedule of its *current* config (e.g. a longer ``train.steps``).
    """
    total, warmup, kind, min_ratio = cfg.steps, cfg.warmup_steps, cfg.schedule, cfg.min_lr / cfg.lr

    def factor(step: int) -> float:
        return lr_factor(step, total=total, warmup=warmup, kind=kind, min_ratio=min_ratio)

    return LambdaLR(optimizer, factor)


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW at ``cfg.lr``; weight decay ``cfg.weight_decay`` on weights with >= 2 dims, none on
    biases, norm scales and parameters flagged ``p._no_weight_decay = True`` (Mamba's ``A_log``, ``D``).
    """
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or getattr(p, "_no_weight_decay", False) else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr)
