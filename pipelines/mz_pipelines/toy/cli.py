"""Verbs of the toy domain: ``synth``, ``train``, ``evaluate``, ``predict``, ``bench``.

This module only registers verbs; torch and the model are imported inside them, so ``--help``
and user errors answer without loading torch.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from mz_pipelines.runtime.errors import UserError
from mz_pipelines.runtime.registry import Domain
from mz_pipelines.runtime.rundir import RunDir, saved_config_base
from mz_pipelines.runtime.verbs import add_checkpoint_argument, add_train_arguments, run_train

from .config import ToyConfig

NAME = "toy"
DOMAIN = Domain(NAME, help="Reference domain of the pipeline runtime: a tiny SSM regressing a hidden linear recurrence.")



# ------------------------------------------------------------------ synth
def _synth_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", metavar="DIR", help="output folder (default: data.path, else data/toy)")


@DOMAIN.verb("synth", help="write the synthetic train/val splits to a folder", config=ToyConfig, arguments=_synth_args)
def synth(cfg: ToyConfig, args: argparse.Namespace) -> int:
    from .data import write_dataset

    out = Path(args.out or cfg.data.path or "data/toy")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    for path in write_dataset(out, cfg.data):
        print(path)
    return 0


# ------------------------------------------------------------------ train
@DOMAIN.verb(
    "train",
    help="train the toy model (torchrun --nproc_per_node=K for DDP)",
    config=ToyConfig,
    arguments=add_train_arguments,
    config_base=saved_config_base(NAME, when=lambda a: a.resume),
)
def train(cfg: ToyConfig, args: argparse.Namespace) -> int:
    from .task import build_task

    return run_train(lambda: build_task(cfg), cfg, args, NAME)


# --------------------------------------------------------- evaluate/predict
def _load_trained(cfg: ToyConfig, which: str):  # -> (ToySSM, device, checkpoint path)
    path = RunDir.for_config(cfg.run, NAME).trained_checkpoint(which)  # before torch loads: fast errors

    from mz_pipelines.runtime.checkpoint import load_checkpoint, load_model_weights
    from mz_pipelines.runtime.distributed import resolve_device

    from .task import build_model

    ckpt = load_checkpoint(path)
    device = resolve_device(cfg.train.device)
    model = build_model(cfg)
    load_model_weights(model, ckpt["model"], source=path)
    return model.to(device).eval(), device, path


def _evaluate_args(p: argparse.ArgumentParser) -> None:
    add_checkpoint_argument(p)
    p.add_argument("--split", choices=["val", "train"], default="val", help="data split to score (default val)")


@DOMAIN.verb(
    "evaluate",
    help="score a trained run on a data split; writes eval_<split>.json",
    config=ToyConfig,
    arguments=_evaluate_args,
    config_base=saved_config_base(NAME),
)
def evaluate(cfg: ToyConfig, args: argparse.Namespace) -> int:
    RunDir.for_config(cfg.run, NAME).trained_checkpoint(args.checkpoint)  # fail fast, before torch loads

    import torch

    from mz_pipelines.runtime.bench import format_table
    from mz_pipelines.runtime.engine import move_to
    from mz_pipelines.runtime.files import write_json

    from .task import dataset, regression_metrics

    model, device, path = _load_trained(cfg, args.checkpoint)
    data = dataset(cfg, args.split)
    batch = cfg.train.eval_batch_size or cfg.train.batch_size
    batches = (move_to(data[i : i + batch], device) for i in range(0, len(data), batch))
    with torch.no_grad():
        metrics = regression_metrics(model, batches)
    out = RunDir.for_config(cfg.run, NAME).path / f"eval_{args.split}.json"
    write_json(out, {"checkpoint": str(path), "split": args.split, "n": len(data), "metrics": metrics})
    print(format_table([{"metric": k, "value": round(v, 6)} for k, v in metrics.items()]))
    print(f"wrote {out}")
    return 0


def _predict_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", required=True, metavar="FILE", help="inputs [N, L, C]: .npy, or .npz with array 'x'")
    p.add_argument("--output", metavar="FILE", help="predictions [N, L, 1] as .npy (default: <input>_pred.npy)")
    add_checkpoint_argument(p)


@DOMAIN.verb(
    "predict",
    help="predict targets for an input array with a trained run",
    config=ToyConfig,
    arguments=_predict_args,
    config_base=saved_config_base(NAME),
)
def predict(cfg: ToyConfig, args: argparse.Namespace) -> int:
    import numpy as np

    from .data import read_inputs

    out = Path(args.output) if args.output else Path(args.input).with_name(Path(args.input).stem + "_pred.npy")
    if out.suffix != ".npy":
        raise UserError(f"--output must end in .npy, got {out}")
    x = read_inputs(args.input, channels=cfg.data.channels)  # checked before torch loads: fast errors

    import torch

    from mz_pipelines.runtime.files import atomic_open

    model, device, _ = _load_trained(cfg, args.checkpoint)
    batch = cfg.train.eval_batch_size or cfg.train.batch_size
    with torch.no_grad():
        preds = [model(torch.from_numpy(x[i : i + batch]).to(device)).float().cpu() for i in range(0, len(x), batch)]
    y = torch.cat(preds).numpy() if preds else np.zeros((0, x.shape[1], 1), np.float32)
    with atomic_open(out, "wb") as f:
        np.save(f, y)
    print(f"wrote {out} {tuple(y.shape)}")
    return 0


# ------------------------------------------------------------------ bench
def _bench_args(p: argparse.ArgumentParser) -> None:
    from mz_pipelines.runtime.bench import add_bench_arguments, int_at_least

    p.add_argument(
        "--lengths", type=int_at_least(1), nargs="+", default=[16, 64, 256], help="sequence lengths L (default 16 64 256)"
    )
    p.add_argument("--batch", type=int_at_least(1), default=8, help="batch size B (default 8)")
    p.add_argument("--width", type=int_at_least(1), default=16, help="recurrence channels D (default 16)")
    add_bench_arguments(p, warmup=2, repeat=5)


@DOMAIN.verb("bench", help="time forward+backward of the loop vs conv recurrence", arguments=_bench_args)
def bench(cfg: None, args: argparse.Namespace) -> int:
    import torch

    from mz_pipelines.runtime.bench import BenchReport, compare, environment
    from mz_pipelines.runtime.distributed import resolve_device

    from .model import ToySSM

    device = resolve_device(args.device)
    measurements = []
    for length in args.lengths:
        torch.manual_seed(0)
        x = torch.randn(args.batch, length, 3, device=device)
        models = {mode: ToySSM(3, args.width, mode=mode).to(device) for mode in ("loop", "conv")}
        models["conv"].load_state_dict(models["loop"].state_dict())

        def step(m: ToySSM) -> None:
            m.zero_grad(set_to_none=True)
            m(x).square().mean().backward()

        measurements += compare(
            {mode: (lambda m=m: step(m)) for mode, m in models.items()},
            group=f"L={length}",
            warmup=args.warmup,
            repeat=args.repeat,
            device=device,
            memory=not args.no_memory,
            params={"B": args.batch, "L": length, "D": args.width},
        )
    report = BenchReport(measurements, baseline="loop", meta=environment(device))
    print(report.table())
    if args.json:
        print(f"wrote {report.write_json(args.json)}")
    return 0
