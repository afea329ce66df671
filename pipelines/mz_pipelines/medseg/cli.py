"""Verbs of the medseg domain: ``synth``, ``train``, ``evaluate``, ``predict``, ``export``, ``bench``.

Only registers verbs; torch, MONAI and nibabel load inside them, so ``--help`` and user errors
answer fast.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from mz_pipelines.runtime.errors import UserError
from mz_pipelines.runtime.registry import Domain
from mz_pipelines.runtime.rundir import RunDir, saved_config_base
from mz_pipelines.runtime.verbs import add_checkpoint_argument, add_train_arguments, run_train

from .config import MedsegConfig

NAME = "medseg"
DOMAIN = Domain(NAME, help="Medical image segmentation (MONAI): SegMamba-style 3D, VM-UNet/MSVM-style 2D, baselines.")



# ------------------------------------------------------------------ synth
def _synth_args(p: argparse.ArgumentParser) -> None:
    from mz_pipelines.runtime.bench import int_at_least

    p.add_argument("--out", metavar="DIR", help="task folder (default: data.path)")
    p.add_argument("--dims", type=int, choices=[2, 3], default=3, help="2D images or 3D volumes (default 3)")
    p.add_argument("--n-train", type=int_at_least(1), default=16, help="training cases (default 16)")
    p.add_argument("--n-val", type=int_at_least(1), default=4, help="validation cases (default 4)")
    p.add_argument("--n-test", type=int_at_least(0), default=2, help="test cases in imagesTs (default 2)")
    p.add_argument("--size", type=int_at_least(16), default=None, help="training case size (default 48 in 3D, 96 in 2D)")
    p.add_argument("--eval-size", type=int_at_least(16), default=None, help="validation/test size (default 4/3 of --size)")
    p.add_argument("--classes", type=int, choices=[1, 2, 3], default=1, help="labeled shape families (default 1)")
    p.add_argument("--noise", type=float, default=1.0, help="noise sigma relative to object contrast (default 1.0)")
    p.add_argument("--affine", choices=["identity", "aniso", "flip"], default="aniso", help="voxel geometry (default aniso)")
    p.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")


@DOMAIN.verb("synth", help="write a synthetic Decathlon-style task (NIfTI + dataset.json)", config=MedsegConfig, arguments=_synth_args)
def synth(cfg: MedsegConfig, args: argparse.Namespace) -> int:
    from .dataset_json import read_task
    from .synth import threshold_baseline, write_task

    out = Path(args.out or cfg.data.path)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    if args.noise < 0:
        raise UserError(f"--noise must be >= 0, got {args.noise}")
    size = args.size or (48 if args.dims == 3 else 96)
    path = write_task(
        out, n_train=args.n_train, n_val=args.n_val, n_test=args.n_test, size=size, eval_size=args.eval_size,
        spatial_dims=args.dims, classes=args.classes, noise=args.noise, affine=args.affine, seed=args.seed,
    )
    base = threshold_baseline(read_task(out), "validation")
    print(f"wrote {path}")
    print(f"best global-threshold Dice on validation: {base['dice']:.3f} (what a model has to beat)")
    return 0


# ------------------------------------------------------------------ train
@DOMAIN.verb(
    "train",
    help="train a segmentation network on a task folder (torchrun for DDP)",
    config=MedsegConfig,
    arguments=add_train_arguments,
    config_base=saved_config_base(NAME, when=lambda a: a.resume),
)
def train(cfg: MedsegConfig, args: argparse.Namespace) -> int:
    from .task import build_task, with_task

    cfg = with_task(cfg)
    return run_train(lambda: build_task(cfg), cfg, args, NAME)


# ------------------------------------------------------------- evaluate
def _evaluate_args(p: argparse.ArgumentParser) -> None:
    add_checkpoint_argument(p)
    p.add_argument("--split", choices=["validation", "test", "training"], default="validation", help="split to score")
    p.add_argument("--tta", choices=["none", "flip"], default=None, help="test-time augmentation (default: infer.tta)")
    p.add_argument("--out", metavar="DIR", help="output folder (default: <run>/eval_<split>)")


@DOMAIN.verb(
    "evaluate",
    help="sliding-window Dice / HD95 / ASSD per case and class; CSV, JSON and a figure",
    config=MedsegConfig,
    arguments=_evaluate_args,
    config_base=saved_config_base(NAME),
)
def evaluate(cfg: MedsegConfig, args: argparse.Namespace) -> int:
    ckpt = RunDir.for_config(cfg.run, NAME).trained_checkpoint(args.checkpoint)  # fail fast, before torch
    from .task import evaluate_split, load_trained

    model, trained = load_trained(ckpt)
    trained.data.path = cfg.data.path  # the data may have moved; the model's preprocessing stays
    if args.tta:
        trained.infer.tta = args.tta
    out = Path(args.out) if args.out else RunDir.for_config(cfg.run, NAME).path / f"eval_{args.split}"
    summary, paths = evaluate_split(model, trained, args.split, out, quiet=args.quiet)
    fg = summary["foreground"]
    print(f"{args.split}: n={summary['n_cases']} foreground Dice {fg['dice_mean']:.4f}"
          + (f", HD95 {fg['hd95_mm_mean']:.2f} mm" if fg.get("hd95_mm_mean") is not None else ""))
    for p in paths:
        print(f"wrote {p}")
    return 0


# -------------------------------------------------------------- predict
def _predict_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", required=True, nargs="+", metavar="FILE",
                   help="NIfTI image(s) of one case, one per channel in channel order, or a folder of single-channel cases")
    p.add_argument("--output", required=True, metavar="DIR", help="folder for <case>_seg.nii.gz and <case>_volumes.json")
    p.add_argument("--tta", choices=["none", "flip"], default=None, help="test-time augmentation (default: infer.tta)")
    add_checkpoint_argument(p)


@DOMAIN.verb(
    "predict",
    help="segment NIfTI images; masks are written in each input's own geometry, with volumes in mL",
    config=MedsegConfig,
    arguments=_predict_args,
    config_base=saved_config_base(NAME),
)
def predict(cfg: MedsegConfig, args: argparse.Namespace) -> int:
    ckpt = RunDir.for_config(cfg.run, NAME).trained_checkpoint(args.checkpoint)
    inputs = [Path(p) for p in args.input]
    for p in inputs:
        if not p.exists():
            raise UserError(f"--input {p} does not exist")
    from .predict import predict_file
    from .task import load_trained

    model, trained = load_trained(ckpt)
    if args.tta:
        trained.infer.tta = args.tta
    if len(inputs) == 1 and inputs[0].is_dir():
        groups = [[f] for f in sorted(inputs[0].iterdir()) if f.name.endswith((".nii.gz", ".nii"))]
        if not groups:
            raise UserError(f"--input {inputs[0]} holds no .nii/.nii.gz files")
        if trained.model.in_channels != 1:
            raise UserError(f"--input folder: the model takes {trained.model.in_channels} channels; pass one case's files instead")
    else:
        groups = [inputs]
    out = Path(args.output)
    for files in groups:
        result = predict_file(model, files, cfg=trained, out_dir=out)
        vols = ", ".join(f"{k} {v:.2f} mL" for k, v in result["volumes_ml"].items())
        print(f"wrote {result['mask']} ({vols})")
    return 0


# --------------------------------------------------------------- export
def _export_args(p: argparse.ArgumentParser) -> None:
    add_checkpoint_argument(p)
    p.add_argument("--out", required=True, metavar="DIR", help="bundle folder to write")


@DOMAIN.verb(
    "export",
    help="export a trained run as a MONAI bundle (configs/metadata.json, configs/inference.json, models/model.pt)",
    config=MedsegConfig,
    arguments=_export_args,
    config_base=saved_config_base(NAME),
)
def export(cfg: MedsegConfig, args: argparse.Namespace) -> int:
    ckpt = RunDir.for_config(cfg.run, NAME).trained_checkpoint(args.checkpoint)
    from .bundle import export_bundle
    from .models.registry import MODELS, resolved_kwargs
    from .task import load_trained

    model, trained = load_trained(ckpt)
    m, d = trained.model, trained.data
    module, _, cls = MODELS[m.name].target.partition(":")
    kwargs = {**resolved_kwargs(m.name, spatial_dims=d.spatial_dims, preset=m.preset),
              "spatial_dims": d.spatial_dims, "in_channels": m.in_channels, "out_channels": m.out_channels}
    out = export_bundle(
        args.out,
        network_target=f"mz_pipelines.medseg.models{module}.{cls}",
        network_kwargs={k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()},
        state_dict=model.state_dict(),
        spatial_dims=d.spatial_dims,
        in_channels=m.in_channels,
        out_channels=m.out_channels,
        labels=m.labels,
        roi=d.roi,
        spacing=d.spacing or None,
        intensity=d.intensity,
        overlap=trained.infer.overlap,
        sw_batch_size=trained.infer.sw_batch_size,
    )
    print(f"wrote MONAI bundle {out}")
    return 0


# ---------------------------------------------------------------- bench
def _bench_args(p: argparse.ArgumentParser) -> None:
    from mz_pipelines.runtime.bench import int_at_least

    from .bench import BLOCK_IMPL_CHOICES, CHECKPOINTING

    p.add_argument("--models", nargs="+", default=["segmamba", "swinunetr", "segresnet"],
                   help="registry names, optionally name:preset (default segmamba swinunetr segresnet)")
    p.add_argument("--preset", default="full", help="preset for names without one (default full)")
    p.add_argument("--baseline", default="swinunetr", help="ratios are taken against this model (default swinunetr)")
    p.add_argument("--sizes", type=int_at_least(16), nargs="+", default=[64, 96, 128], help="cubic sizes (default 64 96 128)")
    p.add_argument("--in-channels", type=int_at_least(1), default=1)
    p.add_argument("--out-channels", type=int_at_least(2), default=2)
    p.add_argument("--threads", type=int_at_least(1), default=os.cpu_count() or 1, help="torch threads (default: all cores)")
    p.add_argument("--mem-cap-gb", type=float, default=20.0, help="address-space cap of the memory subprocesses (CPU)")
    p.add_argument("--warmup", type=int_at_least(0), default=1)
    p.add_argument("--repeat", type=int_at_least(1), default=2)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--use-checkpoint", choices=CHECKPOINTING, default="off",
                   help="activation checkpointing for the models that support it (segmamba, swinunetr): "
                        "off, on, or both (one row each; default off)")
    p.add_argument("--block-impl", choices=BLOCK_IMPL_CHOICES, default="registered",
                   help="UNETR residual blocks of the models that take block_impl (segmamba, swinunetr): each "
                        "model's default (registered: SegMamba lean, SwinUNETR MONAI's), or all lean, or all MONAI's")
    p.add_argument("--breakdown", type=int_at_least(0), default=0, metavar="DEPTH",
                   help="also report the bytes each module saves for backward at the smallest size, module "
                        "names cut to DEPTH parts (0: off)")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")
    p.add_argument("--plot", metavar="PNG", help="write a PNG of time and memory against voxels")


@DOMAIN.verb("bench", help="params, FLOPs, time and peak memory vs volume size against SwinUNETR/SegResNet", arguments=_bench_args)
def bench(cfg: None, args: argparse.Namespace) -> int:
    from mz_pipelines.runtime.files import write_json

    from .bench import format_report, plot, run

    from .models.registry import MODELS

    for m in args.models:
        name = m.partition(":")[0]
        if name not in MODELS:
            raise UserError(f"--models: unknown model {name!r}; expected names from {sorted(MODELS)}")
    try:
        report = run(args)
    except ValueError as e:
        raise UserError(str(e)) from None
    print(format_report(report))
    if args.json:
        print(f"wrote {write_json(args.json, report)}")
    if args.plot:
        print(f"wrote {plot(report, Path(args.plot))}")
    return 0
