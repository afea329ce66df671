"""Config of the toy domain: ``data``, ``model``, ``train`` (engine) and ``run`` (folder) sections."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from mz_pipelines.runtime.schema import RunConfig, TrainConfig


@dataclass
class ToyDataConfig:
    """Synthetic sequences: ``x`` ``[N, L, C]`` white noise, ``y`` ``[N, L, 1]`` a hidden linear
    recurrence of ``x`` plus noise. ``path`` empty: generate in memory from ``seed``; otherwise
    read the folder written by ``synth``.
    """

    path: str = ""
    n_train: int = 512
    n_val: int = 128
    length: int = 32
    channels: int = 3
    noise: float = 0.05
    seed: int = 1234

    def __post_init__(self) -> None:
        for name in ("n_train", "n_val", "length", "channels"):
            if getattr(self, name) < 1:
                raise ValueError(f"data.{name} must be >= 1, got {getattr(self, name)}")
        if self.noise < 0:
            raise ValueError(f"data.noise must be >= 0, got {self.noise}")


@dataclass
class ToyModelConfig:
    """``width`` recurrence channels; ``mode`` picks the recurrence implementation (same result)."""

    width: int = 8
    mode: Literal["conv", "loop"] = "conv"

    def __post_init__(self) -> None:
        if self.width < 1:
            raise ValueError(f"model.width must be >= 1, got {self.width}")


def _toy_train() -> TrainConfig:
    return TrainConfig(
        steps=300, batch_size=32, lr=2e-2, warmup_steps=10, weight_decay=0.0, eval_every=50, log_every=10, checkpoint_every=50
    )


@dataclass
class ToyConfig:
    data: ToyDataConfig = field(default_factory=ToyDataConfig)
    model: ToyModelConfig = field(default_factory=ToyModelConfig)
    train: TrainConfig = field(default_factory=_toy_train)
    run: RunConfig = field(default_factory=RunConfig)
