"""``mambazoo bench backbones``: cost of the zoo backbones against input resolution, next to the
transformers they are usually compared with (Vim vs a DeiT-Tiny-shaped ViT, VMamba vs Swin-T).

For each model and square resolution it reports, in one run:

* parameters (classification model, 1000 classes, as published);
* FLOPs per image: ``torch.utils.flop_counter.FlopCounterMode`` over one forward (2 FLOPs per
  multiply-add), where the FLOPs it counted inside every ``SelectiveSSM`` (only the projection
  einsums; the scan kernel is invisible to it) are replaced by ``SelectiveSSM.flops(batch, length)``
  for the (batch, length) each call actually saw (recorded by forward hooks). Published tables
  (fvcore) count one per multiply-add, i.e. about half of these numbers;
* forward latency: median of ``--repeat`` timed ``torch.inference_mode`` forwards after ``--warmup``
  untimed ones, with ``torch.set_num_threads(--threads)``; the models of one resolution are timed in
  turns (one forward of each per round), so a model and its transformer share the machine's state
  (timing stops after the round in which ``--budget`` seconds were passed);
* peak memory of one forward: on CPU, each (model, resolution) runs in a fresh Python subprocess
  (glibc's mmap threshold fixed at 64 KiB, :func:`mz_kernels.measure.measurement_env`)
  that builds the model, runs one forward on the smallest input (paying the process's one-off
  first-forward costs: kernel libraries, thread pools), builds the input, resets the kernel's
  peak-RSS mark (``/proc/self/clear_refs``), then reads the increase of the peak resident set size
  (``VmHWM``) over the resident size just before one ``inference_mode`` forward
  (:class:`mz_kernels.measure.PeakMemory`): the activations and workspaces of that forward, as the
  OS sees them (where /proc is missing, the process-lifetime peak is reported instead);
  on CUDA, ``torch.cuda.max_memory_allocated`` above the memory held before the forward;
* ratios of each Mamba model to its transformer (latency and memory; below 1 means cheaper).

A PNG (latency and memory against the number of 16x16-patch tokens, log-log) and a JSON report are
written to ``--out``.

Examples:
    mambazoo bench backbones
    mambazoo bench backbones --resolutions 224,512 --models vim_tiny --repeat 5 --out bench_out
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mz_kernels.measure import PeakMemory, last_error_line, run_measurement_child

from ._registry import create_backbone, list_backbones
from .layers.ssm import SelectiveSSM

BASELINES = ("deit_tiny", "swin_t")
DEFAULT_MODELS = ("vim_tiny", "vmamba_tiny")
DEFAULT_RESOLUTIONS = (224, 512, 1024, 1248)
_MEM_TAG = "MZ_BENCH_MEMORY "


# ---- models --------------------------------------------------------------------------------------
def baseline_for(name: str) -> str | None:
    """The transformer a zoo model is compared with: ``deit_tiny`` for plain Vim-style models,
    ``swin_t`` for hierarchical VMamba-style ones, ``None`` otherwise."""
    if name.startswith("vim"):
        return "deit_tiny"
    if name.startswith(("vmamba", "vanilla_vmamba")):
        return "swin_t"
    return None


def build_model(name: str, resolution: int) -> nn.Module:
    """A classification model (1000 classes) for ``resolution`` x ``resolution`` inputs.

    ``deit_tiny``: ``torchvision.models.VisionTransformer`` with DeiT-Tiny's shape (patch 16, 12 layers,
    3 heads, width 192, MLP 768; position embedding built for ``resolution``). ``swin_t``:
    ``torchvision.models.swin_t(weights=None)``. Anything else: ``create_backbone(name, img_size=resolution)``.
    """
    if name == "deit_tiny":
        from torchvision.models import VisionTransformer

        return VisionTransformer(
            image_size=resolution, patch_size=16, num_layers=12, num_heads=3, hidden_dim=192, mlp_dim=768
        )
    if name == "swin_t":
        from torchvision.models import swin_t

        return swin_t(weights=None)
    return create_backbone(name, num_classes=1000, img_size=resolution)


def input_multiple(name: str, model: nn.Module) -> int:
    """The size inputs of ``model`` must be a multiple of (Swin pads any size itself)."""
    if name == "deit_tiny":
        return 16
    if name == "swin_t":
        return 1
    return max(getattr(model, "input_multiple", (1,)))


def _extra_flop_formulas() -> dict:
    """Formulas FlopCounterMode lacks: the CPU flash-attention kernel behind ``scaled_dot_product_attention``
    (torchvision's ViT attention on CPU), counted like the CUDA kernels: 2 * B * H * Lq * Lk * (E + Ev)."""
    from torch.utils.flop_counter import sdpa_flop_count

    def sdpa_cpu(query, key, value, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query, key, value)

    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    return {} if op is None else {op: sdpa_cpu}


def count_flops(model: nn.Module, x: torch.Tensor) -> dict[str, int]:
    """FLOPs of ``model(x)`` (2 per multiply-add), with the selective scans counted analytically.

    Returns:
        ``total``: counted FLOPs minus those counted inside ``SelectiveSSM`` modules plus
        ``SelectiveSSM.flops(batch, length)`` of every call; ``counted``: FlopCounterMode's raw total;
        ``ssm_counted`` / ``ssm_analytic``: the two SSM terms.
    """
    from torch.utils.flop_counter import FlopCounterMode

    ssms = {n: m for n, m in model.named_modules() if isinstance(m, SelectiveSSM)}
    analytic = [0]

    def hook(mod: SelectiveSSM, args: tuple) -> None:
        batch, length = args[0].shape[:2]  # x: [B, L, K, C]
        analytic[0] += mod.flops(int(batch), int(length))

    handles = [m.register_forward_pre_hook(hook) for m in ssms.values()]
    try:
        with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_extra_flop_formulas()) as counter:
            model(x)
    finally:
        for h in handles:
            h.remove()
    per_module = counter.get_flop_counts()
    root = type(model).__name__
    ssm_counted = sum(sum(per_module.get(f"{root}.{n}", {}).values()) for n in ssms)
    counted = int(counter.get_total_flops())
    return {
        "total": counted - ssm_counted + analytic[0],
        "counted": counted,
        "ssm_counted": int(ssm_counted),
        "ssm_analytic": int(analytic[0]),
    }


# ---- timing and memory -----------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def round_robin_latency(
    fns: dict[str, Callable[[], object]], repeat: int, warmup: int, budget: float, device: torch.device
) -> dict[str, list[float]]:
    """Times (s) of up to ``repeat`` calls of each function, taken in turns (one call of each per
    round, after ``warmup`` untimed rounds), so a model and its baseline see the same machine state;
    stops after the round in which some function's timed calls passed ``budget`` seconds (at least one
    round is timed). A warm-up round slower than ``budget / 4`` ends the warm-up."""

    def timed(fn: Callable[[], object]) -> float:
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        return time.perf_counter() - t0

    for _ in range(warmup):
        if max(timed(fn) for fn in fns.values()) > budget / 4:
            break
    times: dict[str, list[float]] = {name: [] for name in fns}
    while any(len(t) < repeat for t in times.values()) and all(sum(t) < budget for t in times.values()):
        for name, fn in fns.items():
            times[name].append(timed(fn))
    return times


def _memory_child(spec: str) -> None:
    """Entry of the memory subprocess: build, measure one forward, print one tagged JSON line."""
    s = json.loads(spec)
    torch.set_num_threads(int(s["threads"]))
    name, res = s["model"], int(s["resolution"])
    model = build_model(name, res).eval()
    # one-off costs of a process's first forward (kernel libraries, thread pools) are paid on the
    # smallest input first, so they do not count as the forward's memory
    small = 32 if name in BASELINES else input_multiple(name, model)
    warm = build_model(name, small).eval() if name == "deit_tiny" else model
    with torch.inference_mode():
        warm(torch.zeros(1, 3, small, small))
    del warm
    x = torch.randn(int(s["batch"]), 3, res, res, generator=torch.Generator().manual_seed(0))
    gc.collect()
    with torch.inference_mode(), PeakMemory("cpu") as pm:
        model(x)
    print(_MEM_TAG + json.dumps({"peak_bytes": pm.peak_bytes, "method": pm.method}))


def peak_memory_cpu(name: str, resolution: int, batch: int, threads: int, timeout: float = 900.0) -> dict[str, int]:
    """Peak-RSS increase of one forward, measured in a fresh subprocess (see the module docstring).

    Raises:
        RuntimeError: the subprocess failed (its last stderr line is included).
    """
    spec = json.dumps({"model": name, "resolution": resolution, "batch": batch, "threads": threads})
    code = "import sys; from mz_backbones.bench import _memory_child; _memory_child(sys.argv[1])"
    result, proc = run_measurement_child(code, spec, _MEM_TAG, timeout=timeout)
    if result is None:
        raise RuntimeError(f"memory subprocess failed: {last_error_line(proc)}")
    return result


def peak_memory_cuda(fn: Callable[[], object], device: torch.device) -> dict[str, int]:
    """Peak CUDA memory of one ``fn()`` above what was allocated before."""
    with PeakMemory(device) as pm:
        fn()
    return {"peak_bytes": pm.peak_bytes, "method": pm.method}


# ---- the run -------------------------------------------------------------------------------------
def prepare(name: str, resolution: int, *, batch: int, device: torch.device, flops: bool = True):
    """Build ``name`` for ``resolution``: its report row (parameters, FLOPs) and a forward closure
    (``None`` with a ``"skipped: ..."`` status when the resolution does not fit the stride)."""
    row: dict[str, Any] = {
        "model": name,
        "baseline": baseline_for(name),
        "resolution": resolution,
        "tokens": (resolution // 16) ** 2,
        "batch": batch,
    }
    model = build_model(name, resolution).eval()
    mult = input_multiple(name, model)
    if resolution % mult:
        return {**row, "status": f"skipped: resolution {resolution} is not a multiple of the stride {mult}"}, None
    row["params"] = sum(p.numel() for p in model.parameters())
    if flops:
        one = torch.randn(1, 3, resolution, resolution, generator=torch.Generator().manual_seed(0))
        row["flops"] = count_flops(model, one)
    model = model.to(device)
    x = torch.randn(batch, 3, resolution, resolution, generator=torch.Generator().manual_seed(0)).to(device)

    def forward() -> None:
        with torch.inference_mode():
            model(x)

    return {**row, "status": "ok"}, forward


def measure_resolution(
    models: list[str],
    resolution: int,
    *,
    batch: int,
    repeat: int,
    warmup: int,
    budget: float,
    threads: int,
    device: torch.device,
    flops: bool = True,
    memory: bool = True,
    log: Callable[[str], None] = lambda s: None,
) -> list[dict[str, Any]]:
    """The rows of every model at one resolution: built and counted one by one, timed in turns
    (:func:`round_robin_latency`), then each one's peak memory (a fresh subprocess on CPU).
    A model that fails becomes an ``"error: ..."`` row and the others go on."""
    rows: dict[str, dict[str, Any]] = {}
    fns: dict[str, Callable[[], None]] = {}

    def guarded(name: str, step: Callable[[], None]) -> None:
        try:
            step()
        except Exception as e:  # report and keep going (e.g. out of memory at the largest size)
            first = (str(e).strip().splitlines() or [""])[0]
            rows[name] = {**rows.get(name, {}), "model": name, "baseline": baseline_for(name), "resolution": resolution,
                          "tokens": (resolution // 16) ** 2, "batch": batch, "status": f"error: {type(e).__name__}: {first}"}
            fns.pop(name, None)

    for name in models:
        log(f"  {name} @ {resolution} ...")

        def build(name: str = name) -> None:
            rows[name], fn = prepare(name, resolution, batch=batch, device=device, flops=flops)
            if fn is not None:
                fns[name] = fn

        guarded(name, build)
    if fns:
        log(f"  timing {', '.join(fns)} @ {resolution} in turns ...")
        try:
            for name, times in round_robin_latency(fns, repeat, warmup, budget, device).items():
                rows[name]["latency_s"], rows[name]["latency_times_s"] = statistics.median(times), times
        except Exception as e:  # e.g. one model runs out of memory: every row of the round says so
            first = (str(e).strip().splitlines() or [""])[0]
            for name in fns:
                rows[name]["status"] = f"error: {type(e).__name__}: {first}"
            fns.clear()
    for name in list(fns):
        if not memory:
            continue
        if device.type == "cuda":
            guarded(name, lambda name=name: rows[name].__setitem__("memory", peak_memory_cuda(fns[name], device)))
    fns.clear()
    gc.collect()
    if memory and device.type != "cuda":
        for name, row in rows.items():
            if row.get("status") == "ok":
                guarded(name, lambda name=name: rows[name].__setitem__("memory", peak_memory_cpu(name, resolution, batch, threads)))
    return [rows[name] for name in models if name in rows]


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Latency and memory of each Mamba row divided by its baseline's at the same resolution."""
    ok = {(r["model"], r["resolution"]): r for r in rows if r["status"] == "ok"}
    for r in ok.values():
        base = ok.get((r["baseline"], r["resolution"])) if r["baseline"] else None
        if base is None:
            continue
        r["latency_ratio"] = r["latency_s"] / base["latency_s"]
        if "memory" in r and "memory" in base and base["memory"]["peak_bytes"] > 0:
            r["memory_ratio"] = r["memory"]["peak_bytes"] / base["memory"]["peak_bytes"]


def run(
    models: list[str],
    resolutions: list[int],
    *,
    batch: int = 1,
    repeat: int = 5,
    warmup: int = 1,
    budget: float = 60.0,
    threads: int = 1,
    device: torch.device = torch.device("cpu"),
    flops: bool = True,
    memory: bool = True,
    log: Callable[[str], None] = lambda s: None,
) -> dict[str, Any]:
    """Measure every (model, resolution); returns the JSON-able report. Errors become rows."""
    rows = []
    for res in resolutions:
        rows += measure_resolution(models, res, batch=batch, repeat=repeat, warmup=warmup, budget=budget,
                                   threads=threads, device=device, flops=flops, memory=memory, log=log)
        gc.collect()
    add_ratios(rows)
    return {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "threads": threads,
            "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        },
        "settings": {"batch": batch, "repeat": repeat, "warmup": warmup, "budget_s": budget, "flops": flops,
                     "memory": memory, "models": models, "resolutions": resolutions},
        "memory_method": (
            "CUDA max_memory_allocated above the baseline" if device.type == "cuda"
            else "peak RSS increase of one inference forward in a fresh subprocess (peak RSS - RSS before; MALLOC_MMAP_THRESHOLD_=65536)"
        ),
        "rows": rows,
    }


def format_table(report: dict[str, Any]) -> str:
    """Human-readable table of a :func:`run` report."""
    head = f"{'model':<18}{'res':>6}{'tokens':>8}{'params M':>10}{'GFLOPs':>9}{'ms':>10}{'mem MiB':>10}{'ms x':>7}{'mem x':>7}  vs"
    lines = [head, "-" * len(head)]
    for r in report["rows"]:
        prefix = f"{r['model']:<18}{r['resolution']:>6}{r['tokens']:>8}"
        if r["status"] != "ok":
            lines.append(f"{prefix}  {r['status']}")
            continue
        fl = f"{r['flops']['total'] / 1e9:.2f}" if "flops" in r else "-"
        mem = f"{r['memory']['peak_bytes'] / 2**20:.1f}" if "memory" in r else "-"
        lat_x = f"{r['latency_ratio']:.2f}" if "latency_ratio" in r else "-"
        mem_x = f"{r['memory_ratio']:.2f}" if "memory_ratio" in r else "-"
        vs = r["baseline"] if "latency_ratio" in r else ""
        lines.append(
            f"{prefix}{r['params'] / 1e6:>10.2f}{fl:>9}{r['latency_s'] * 1e3:>10.1f}{mem:>10}{lat_x:>7}{mem_x:>7}  {vs}"
        )
    m, s = report["machine"], report["settings"]
    lines += [
        "",
        "tokens: 16x16 patches of the input. GFLOPs: per image, 2 per multiply-add, selective scans counted",
        "analytically (published fvcore numbers are ~half). ms: median forward latency of the batch.",
        f"mem: {report['memory_method']}. x: this model / its transformer (below 1: cheaper).",
        f"batch {s['batch']}, {m['threads']} threads, device {m['device']}, torch {m['torch']}",
    ]
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    """Latency and memory against tokens (log-log), one line per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    models = list(dict.fromkeys(r["model"] for r in report["rows"]))
    for name in models:
        ok = [r for r in report["rows"] if r["model"] == name and r["status"] == "ok"]
        style = "--" if name in BASELINES else "-"
        toks = [r["tokens"] for r in ok]
        axes[0].plot(toks, [r["latency_s"] * 1e3 for r in ok], style, marker="o", label=name)
        mem = [(r["tokens"], r["memory"]["peak_bytes"] / 2**20) for r in ok if r.get("memory", {}).get("peak_bytes", 0) > 0]
        if mem:
            axes[1].plot(*zip(*mem), style, marker="o", label=name)
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    ticks = sorted({r["tokens"] for r in report["rows"] if r["status"] == "ok"})
    for ax, ylabel in zip(axes, ("forward latency (ms)", "peak memory of a forward (MiB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(ticks)
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("tokens (16x16 patches)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_lines():
            ax.legend()
        else:
            ax.text(0.5, 0.5, "not measured", transform=ax.transAxes, ha="center", va="center")
    s, m = report["settings"], report["machine"]
    fig.suptitle(f"batch {s['batch']}, {m['threads']} threads, {m['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- command line ------------------------------------------------------------------------------------
def _ints(text: str, what: str) -> list[int]:
    try:
        vals = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        vals = []
    if not vals or min(vals) < 1:
        raise ValueError(f"bench backbones: --{what} must be a comma list of positive ints, got {text!r}")
    return vals


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mambazoo bench backbones", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(DEFAULT_MODELS),
                   help="comma list of zoo names (their transformer is added: vim* -> deit_tiny, vmamba* -> swin_t) "
                        f"or of {list(BASELINES)} (default: {','.join(DEFAULT_MODELS)})")
    p.add_argument("--resolutions", default=",".join(map(str, DEFAULT_RESOLUTIONS)), help="comma list of square input sizes")
    p.add_argument("--batch", type=int, default=1, help="images per forward")
    p.add_argument("--repeat", type=int, default=5, help="timed forwards per measurement (median)")
    p.add_argument("--warmup", type=int, default=1, help="untimed forwards before timing")
    p.add_argument("--budget", type=float, default=60.0, help="seconds of timed forwards per measurement before stopping early")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores available to this process)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--no-flops", action="store_true", help="skip the FLOP count")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--no-baselines", action="store_true", help="do not add the transformer of each zoo model")
    p.add_argument("--out", default="bench_backbones", metavar="DIR", help="folder for backbones.png and backbones.json")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the JSON report here")
    return p


def _resolve_models(text: str, add_baselines: bool) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ValueError(f"bench backbones: --models must name at least one model, got {text!r}")
    known = set(list_backbones()) | set(BASELINES)
    bad = [n for n in names if n not in known]
    if bad:
        raise ValueError(f"bench backbones: unknown --models {bad}; expected zoo names (list_backbones()) or {list(BASELINES)}")
    if add_baselines:
        for n in list(names):
            b = baseline_for(n)
            if b is not None and b not in names:
                names.insert(names.index(n) + 1, b)
    if any(n in BASELINES for n in names):
        try:
            import torchvision  # noqa: F401
        except ImportError:
            raise ValueError(
                "bench backbones: the transformer baselines need torchvision (pip install 'mambazoo[vision]'); "
                "or pass --no-baselines"
            ) from None
    return names


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``mambazoo bench backbones``; 0 on success, 1 if a measurement failed, 2 on bad options."""
    args = build_parser().parse_args(argv)
    try:
        resolutions = _ints(args.resolutions, "resolutions")
        models = _resolve_models(args.models, not args.no_baselines)
        for name in ("batch", "repeat", "threads"):
            v = getattr(args, name)
            if v is not None and v < 1:
                raise ValueError(f"bench backbones: --{name} must be >= 1, got {v}")
        if args.warmup < 0:
            raise ValueError(f"bench backbones: --warmup must be >= 0, got {args.warmup}")
        if not args.budget > 0:
            raise ValueError(f"bench backbones: --budget must be > 0 seconds, got {args.budget}")
        device = torch.device(args.device)
        if device.type not in ("cpu", "cuda") or (device.type == "cuda" and not torch.cuda.is_available()):
            raise ValueError(f"bench backbones: --device must be cpu or an available cuda device, got {args.device!r}")
    except (ValueError, RuntimeError) as e:
        print(str(e))
        return 2
    threads = args.threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    torch.set_num_threads(threads)
    print(f"benchmarking {models} at {resolutions} on {device}, batch {args.batch}, {threads} threads ...", flush=True)
    report = run(
        models, resolutions, batch=args.batch, repeat=args.repeat, warmup=args.warmup, budget=args.budget,
        threads=threads, device=device, flops=not args.no_flops, memory=not args.no_memory,
        log=lambda s: print(s, flush=True),
    )
    print(format_table(report))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(report, indent=2, default=lambda v: None if isinstance(v, float) and not math.isfinite(v) else str(v))
    for path in [out / "backbones.json", *([Path(args.json)] if args.json else [])]:
        path.write_text(text, encoding="utf-8")
        print(f"wrote {path}")
    if any(r["status"] == "ok" for r in report["rows"]):
        plot(report, out / "backbones.png")
        print(f"wrote {out / 'backbones.png'}")
    return 1 if any(r["status"].startswith("error") for r in report["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
