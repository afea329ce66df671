"""How the toy domain plugs into the engine: model, datasets, loss and metrics."""
from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from mz_pipelines.runtime.engine import TrainTask

from .config import ToyConfig
from .data import load_split
from .model import ToySSM


def build_model(cfg: ToyConfig) -> ToySSM:
    return ToySSM(cfg.data.channels, cfg.model.width, mode=cfg.model.mode)


def dataset(cfg: ToyConfig, split: str) -> TensorDataset:
    """Pairs ``(x [L, C], y [L, 1])`` of one split."""
    x, y = load_split(cfg.data, split)
    return TensorDataset(torch.from_numpy(x), torch.from_numpy(y))


def mse_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Mean squared error of ``model(x)`` ``[B, L, 1]`` against ``y``."""
    x, y = batch
    return F.mse_loss(model(x).float(), y)


def regression_metrics(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> Mapping[str, float]:
    """``loss`` (= MSE), ``mae`` and ``r2`` over all targets of all batches."""
    sse = sae = total = total_sq = 0.0
    n = 0
    for x, y in batches:
        err = model(x).float() - y
        sse += float(err.square().sum())
        sae += float(err.abs().sum())
        total += float(y.sum())
        total_sq += float(y.square().sum())
        n += y.numel()
    if n == 0:
        raise ValueError("regression_metrics: no batches to evaluate")
    var = total_sq / n - (total / n) ** 2
    return {"loss": sse / n, "mae": sae / n, "r2": 1.0 - (sse / n) / var if var > 0 else float("nan")}


def build_task(cfg: ToyConfig) -> TrainTask:
    return TrainTask(
        model=build_model(cfg),
        train_data=dataset(cfg, "train"),
        val_data=dataset(cfg, "val"),
        loss=mse_loss,
        evaluate=regression_metrics,
    )
