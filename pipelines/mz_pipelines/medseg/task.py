"""How the medseg domain plugs into the engine: task-resolved config, model, data, loss, metrics.

Also :func:`load_trained`, the one way every consumer (``evaluate``, ``predict``, ``export``, the
app) turns a run's checkpoint back into an eval-mode network and its config.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mz_pipelines.runtime.checkpoint import load_checkpoint, load_model_weights
from mz_pipelines.runtime.config import config_from_dict
from mz_pipelines.runtime.engine import TrainTask
from mz_pipelines.runtime.errors import UserError

from .config import MedsegConfig


def with_task(cfg: MedsegConfig) -> MedsegConfig:
    """``cfg`` resolved against ``data.path``'s dataset.json: ``data.roi`` (empty: the default for the
    task's dimensionality), ``model.name`` (``"auto"``), ``model.in_channels``/``out_channels``/``labels``.

    Raises:
        UserError: the task does not fit the config (spatial dimensionality, channel or class counts).
    """
    from .config import DEFAULT_MODEL, DEFAULT_ROI
    from .dataset_json import read_task

    info = read_task(cfg.data.path)
    dims = cfg.data.spatial_dims
    if dims and dims != info.spatial_dims:
        what = f"data.roi={cfg.data.roi}" if cfg.data.roi else f"data.spacing={cfg.data.spacing}"
        raise UserError(f"{info.root}: the task is {info.spatial_dims}D but {what} is {dims}D (give {info.spatial_dims} values)")
    n_in, n_out = len(info.channel_names), max(info.labels) + 1
    for key, want, got in (("in_channels", n_in, cfg.model.in_channels), ("out_channels", n_out, cfg.model.out_channels)):
        if got and got != want:
            raise UserError(f"model.{key}={got} but {info.root}/dataset.json implies {want}")
    data = dataclasses.replace(cfg.data, roi=list(cfg.data.roi or DEFAULT_ROI[info.spatial_dims]))
    model = dataclasses.replace(
        cfg.model,
        name=DEFAULT_MODEL[info.spatial_dims] if cfg.model.name == "auto" else cfg.model.name,
        in_channels=n_in,
        out_channels=n_out,
        labels={str(k): v for k, v in sorted(info.labels.items())},
    )
    return dataclasses.replace(cfg, data=data, model=model)


def build_model(cfg: MedsegConfig) -> nn.Module:
    """The network named by ``cfg.model`` (channels must be resolved, see :func:`with_task`)."""
    from .models.registry import build_model as build

    if not cfg.model.in_channels or not cfg.model.out_channels:
        raise ValueError("build_model: model.in_channels/out_channels are unresolved (call with_task first)")
    try:
        return build(
            cfg.model.name,
            spatial_dims=cfg.data.spatial_dims,
            in_channels=cfg.model.in_channels,
            out_channels=cfg.model.out_channels,
            preset=cfg.model.preset,
            **({"use_checkpoint": True} if cfg.model.use_checkpoint else {}),
            **({"block_impl": cfg.model.block_impl} if cfg.model.block_impl else {}),
        )
    except ValueError as e:
        raise UserError(str(e)) from None


def load_trained(checkpoint: str | os.PathLike[str], *, device: str | torch.device = "cpu") -> tuple[nn.Module, MedsegConfig]:
    """Eval-mode network and resolved config from a medseg checkpoint (``best.pt`` or ``checkpoint.pt``).

    ``checkpoint`` may also be a run folder (``best.pt`` preferred, else ``checkpoint.pt``).

    Raises:
        UserError: missing/corrupt file, or not a medseg checkpoint.
    """
    path = Path(checkpoint)
    if path.is_dir():
        path = path / "best.pt" if (path / "best.pt").is_file() else path / "checkpoint.pt"
    ckpt = load_checkpoint(path)
    raw = ckpt.get("config")
    if not isinstance(raw, Mapping) or "model" not in raw or "data" not in raw:
        raise UserError(f"{path} is not a medseg checkpoint (no medseg config inside)")
    cfg = config_from_dict(MedsegConfig, raw, source=str(path))
    model = build_model(cfg)
    load_model_weights(model, ckpt["model"], source=path)
    return model.to(device).eval(), cfg


def dice_ce_loss(out_channels: int) -> nn.Module:
    """MONAI ``DiceCELoss`` on logits ``[B, K, *S]`` vs integer labels ``[B, 1, *S]`` (softmax, one-hot)."""
    from monai.losses import DiceCELoss

    return DiceCELoss(to_onehot_y=True, softmax=True, include_background=out_channels == 1)


def volume_scores(
    model: nn.Module, volumes: Iterable[Mapping[str, Any]], cfg: MedsegConfig
) -> dict[str, float]:
    """Sliding-window Dice over whole volumes: ``dice`` (mean over cases of the foreground-class mean)
    and ``dice_<k>`` per foreground class, with the empty-mask policy of :mod:`.metrics`.
    """
    from .inference import argmax_mask, sliding_window_predict
    from .metrics import case_metrics

    classes = list(range(1, cfg.model.out_channels))
    per_case: list[float] = []
    per_class: dict[int, list[float]] = {k: [] for k in classes}
    for item in volumes:
        image, label = item["image"], item["label"]
        probs = sliding_window_predict(
            model, image, roi=cfg.data.roi, overlap=cfg.infer.overlap, mode=cfg.infer.mode,
            sw_batch_size=cfg.infer.sw_batch_size, tta="none",
        )
        pred = argmax_mask(probs).cpu().numpy()  # [B, *S]
        lab = label.cpu().numpy()  # [B, 1, *S]
        for b in range(pred.shape[0]):
            rows = case_metrics(pred[b], lab[b, 0], classes=classes, spacing=None)
            dices = [float(r["dice"]) for r in rows]
            per_case.append(float(np.mean(dices)))
            for k, d in zip(classes, dices):
                per_class[k].append(d)
    if not per_case:
        raise UserError("validation split is empty: nothing to evaluate")
    scores = {"dice": float(np.mean(per_case))}
    if len(classes) > 1:
        scores.update({f"dice_{k}": float(np.mean(v)) for k, v in per_class.items()})
    return scores


def _check_roi(cfg: MedsegConfig) -> None:
    from .models.registry import input_multiple

    try:
        mult = input_multiple(cfg.model.name, cfg.data.spatial_dims, cfg.model.preset)
    except ValueError as e:
        raise UserError(str(e)) from None
    if any(r % mult for r in cfg.data.roi):
        raise UserError(f"data.roi={cfg.data.roi} must be a multiple of {mult} in every axis for model {cfg.model.name!r} ({cfg.model.preset})")


def datasets(cfg: MedsegConfig):  # -> (PatchDataset, VolumeDataset)
    """Training patches and whole validation volumes of ``cfg.data.path``."""
    from .data import PatchDataset, VolumeDataset
    from .dataset_json import check_task, read_task

    info = read_task(cfg.data.path)
    check_task(info, deep=False, splits=("training", "validation"))
    if not info.training or not info.validation:
        raise UserError(f"{info.root}: training needs labeled 'training' and 'validation' cases")
    common = dict(spatial_dims=cfg.data.spatial_dims, spacing=cfg.data.spacing or None, intensity=cfg.data.intensity,
                  labels=list(info.labels), channels=len(info.channel_names))
    train = PatchDataset(
        info.training, roi=tuple(cfg.data.roi), pos=cfg.data.pos, neg=cfg.data.neg,
        patches_per_case=cfg.data.patches_per_case, seed=cfg.data.seed, **common,
    )
    return train, VolumeDataset(info.validation, **common)


def build_task(cfg: MedsegConfig) -> TrainTask:
    """The engine task: patches, DiceCE on logits, sliding-window validation Dice (``train.monitor='dice'``)."""
    _check_roi(cfg)
    model = build_model(cfg)
    train_data, val_data = datasets(cfg)
    criterion = dice_ce_loss(cfg.model.out_channels)

    def loss(net: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return criterion(net(batch["image"]).float(), batch["label"])

    return TrainTask(
        model=model, train_data=train_data, val_data=val_data, loss=loss,
        evaluate=lambda net, batches: volume_scores(net, batches, cfg),
    )


def evaluate_split(
    model: nn.Module, cfg: MedsegConfig, split: str, out_dir: str | os.PathLike[str], *, quiet: bool = False
) -> tuple[dict[str, Any], list[Path]]:
    """Score ``model`` on a split of ``cfg.data.path``: sliding window (``cfg.infer``), per-case and
    per-class Dice, HD95 and ASSD in mm (in the preprocessed geometry: RAS, ``data.spacing`` when set).

    Returns:
        ``(summary, written paths)``: metrics_per_case.csv, summary.json and a PNG in ``out_dir``.
    """
    from mz_pipelines.runtime.progress import Progress

    from .data import VolumeDataset
    from .dataset_json import read_task
    from .inference import argmax_mask, sliding_window_predict
    from .metrics import case_metrics, summarize
    from .report import write_metrics

    info = read_task(cfg.data.path)
    cases = info.split(split)
    if not cases:
        raise UserError(f"{info.root}: split {split!r} has no cases")
    unlabeled = [c.name for c in cases if c.label is None]
    if unlabeled:
        raise UserError(f"{info.root}: split {split!r} has cases without labels ({', '.join(unlabeled[:3])}); use predict instead")
    data = VolumeDataset(cases, spatial_dims=cfg.data.spatial_dims, spacing=cfg.data.spacing or None,
                         intensity=cfg.data.intensity, labels=list(info.labels), channels=len(info.channel_names))
    names = {int(k): v for k, v in cfg.model.labels.items()} or info.labels
    classes = [k for k in sorted(names) if k != 0]
    device = next(model.parameters()).device
    rows: list[dict[str, Any]] = []
    progress = Progress(len(data), enabled=not quiet)
    for i in range(len(data)):
        item = data[i]
        probs = sliding_window_predict(
            model, item["image"][None].to(device), roi=cfg.data.roi, overlap=cfg.infer.overlap, mode=cfg.infer.mode,
            sw_batch_size=cfg.infer.sw_batch_size, tta=cfg.infer.tta,
        )
        pred = argmax_mask(probs)[0].cpu().numpy()
        for row in case_metrics(pred, item["label"][0].numpy(), classes=classes, spacing=item["spacing"], names=names):
            rows.append({"case": item["case"], **row})
        progress.advance(i + 1)
    progress.close()
    summary = summarize(rows)
    summary.update({"split": split, "tta": cfg.infer.tta, "overlap": cfg.infer.overlap, "model": cfg.model.name})
    return summary, write_metrics(rows, summary, out_dir)
