"""Config sections shared by every domain: ``run`` (where) and ``train`` (how the engine trains).

A domain config embeds them as fields named ``run`` and ``train``::

    @dataclass
    class MyConfig:
        data: MyDataConfig = field(default_factory=MyDataConfig)
        model: MyModelConfig = field(default_factory=MyModelConfig)
        train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=2000, lr=3e-4))
        run: RunConfig = field(default_factory=RunConfig)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


def _positive(section: str, **values: int | float) -> None:
    for name, v in values.items():
        if v <= 0:
            raise ValueError(f"{section}.{name} must be > 0, got {v}")


def _non_negative(section: str, **values: int | float) -> None:
    for name, v in values.items():
        if v < 0:
            raise ValueError(f"{section}.{name} must be >= 0, got {v}")


@dataclass
class RunConfig:
    """Where a run lives: ``<root>/<domain>/<name>/``."""

    root: str = "runs"
    name: str = "default"

    def __post_init__(self) -> None:
        if not self.name or self.name in (".", "..") or "/" in self.name or "\\" in self.name:
            raise ValueError(f"run.name must be a plain folder name, got {self.name!r}")


@dataclass
class TrainConfig:
    """Settings of the training engine (:mod:`mz_pipelines.runtime.engine`).

    ``batch_size`` is the *global* batch: under ``torchrun --nproc_per_node=K`` each rank gets
    ``batch_size / K`` samples per step, so K processes reproduce the single-process run.
    ``amp='auto'`` means bf16 (fp16 + GradScaler where bf16 is unsupported) on CUDA and float32 on CPU.
    Counts of 0 switch a feature off: ``eval_every`` (evaluate only at the end), ``checkpoint_every``
    (checkpoint only at the end), ``grad_clip``, ``patience`` (no early stop), ``warmup_steps``.
    """

    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"
    steps: int = 1000
    batch_size: int = 32
    eval_batch_size: int = 0
    lr: float = 1e-3
    min_lr: float = 0.0
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 0
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    eval_every: int = 0
    log_every: int = 10
    checkpoint_every: int = 500
    patience: int = 0
    min_delta: float = 0.0
    monitor: str = "loss"
    monitor_mode: Literal["min", "max"] = "min"
    num_workers: int = 0
    deterministic: bool = False

    def __post_init__(self) -> None:
        _positive("train", steps=self.steps, batch_size=self.batch_size, lr=self.lr, log_every=self.log_every)
        _non_negative(
            "train",
            eval_batch_size=self.eval_batch_size,
            min_lr=self.min_lr,
            warmup_steps=self.warmup_steps,
            weight_decay=self.weight_decay,
            grad_clip=self.grad_clip,
            eval_every=self.eval_every,
            checkpoint_every=self.checkpoint_every,
            patience=self.patience,
            min_delta=self.min_delta,
            num_workers=self.num_workers,
        )
        if self.min_lr > self.lr:
            raise ValueError(f"train.min_lr must be <= train.lr, got {self.min_lr} > {self.lr}")
        if self.warmup_steps >= self.steps:
            raise ValueError(f"train.warmup_steps must be < train.steps, got {self.warmup_steps} >= {self.steps}")
        if not self.monitor:
            raise ValueError("train.monitor must name an evaluation metric, got ''")
