"""``mambazoo medseg bench``: the SegMamba-style network against SwinUNETR and SegResNet in one run.

Per model and cubic size (default 64^3, 96^3, 128^3; batch 1): parameters, forward FLOPs (selective
scans counted analytically, :mod:`.models.flops`), forward (inference) and training-step (forward +
backward + SGD step) times, and the peak memory of each, measured in a fresh subprocess per
(model, size, mode) so one measurement's allocator state cannot leak into the next: on CPU the growth
of the peak resident set (``VmHWM``), on CUDA ``max_memory_allocated``. The child's address space
is capped (``--mem-cap-gb``), so a model that does not fit reports ``OOM`` instead of taking the
machine down. Ratios are taken against ``--baseline`` at each size, and the scaling exponent ``k``
of ``cost ~ voxels^k`` is fitted over the sizes (1 = linear). Candidates are timed round-robin by
the shared harness (:func:`mz_pipelines.runtime.bench.compare`). ``--use-checkpoint`` adds or swaps in
rows with activation checkpointing, ``--block-impl`` builds every model that takes it with the lean or
MONAI UNETR blocks (:mod:`.models.lean_blocks`), so settings can be compared like for like.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

_TAG = "MZ_MEDSEG_BENCH "


CHECKPOINTING = ("off", "on", "both")
BLOCK_IMPL_CHOICES = ("registered", "lean", "monai")


def _build(name: str, preset: str, in_ch: int, out_ch: int, extra: dict[str, Any] | None = None):
    from .models.registry import build_model

    return build_model(name, spatial_dims=3, in_channels=in_ch, out_channels=out_ch, preset=preset, **(extra or {}))


def _takes(name: str, arg: str) -> bool:
    import inspect

    from .models.registry import MODELS

    return arg in inspect.signature(MODELS[name].cls()).parameters


def supports_checkpoint(name: str) -> bool:
    """Whether the registered network ``name`` takes ``use_checkpoint`` (activation checkpointing)."""
    return _takes(name, "use_checkpoint")


def expand_models(specs: list[str], preset: str, checkpointing: str,
                  block_impl: str = "registered") -> list[tuple[str, str, str, dict[str, Any]]]:
    """``["segmamba", "swinunetr:tiny"]`` -> ``(label, name, preset, extra constructor kwargs)`` rows.

    With ``checkpointing="on"`` or ``"both"``, a model that supports it is measured with activation
    checkpointing (label suffix ``+ckpt``); ``"both"`` keeps its plain row too. ``block_impl``
    ``"lean"``/``"monai"`` builds every model that takes ``block_impl`` that way (label suffix
    ``+lean``/``+monai``); ``"registered"`` keeps each model's default (SegMamba lean, SwinUNETR
    MONAI's)."""
    if checkpointing not in CHECKPOINTING:
        raise ValueError(f"--use-checkpoint must be one of {list(CHECKPOINTING)}, got {checkpointing!r}")
    if block_impl not in BLOCK_IMPL_CHOICES:
        raise ValueError(f"--block-impl must be one of {list(BLOCK_IMPL_CHOICES)}, got {block_impl!r}")
    rows = []
    for spec in specs:
        name, _, p = spec.partition(":")
        p = p or preset
        base, label = {}, f"{name}:{p}"
        if block_impl != "registered" and _takes(name, "block_impl"):
            base, label = {"block_impl": block_impl}, f"{label}+{block_impl}"
        modes = [False]
        if checkpointing != "off" and supports_checkpoint(name):
            modes = [True] if checkpointing == "on" else [False, True]
        rows += [(label + ("+ckpt" if ck else ""), name, p, {**base, **({"use_checkpoint": True} if ck else {})})
                 for ck in modes]
    return rows


def _step_fn(model, x, mode: str):
    import torch

    if mode == "infer":
        model.eval()

        def infer() -> None:
            with torch.inference_mode():
                model(x)

        return infer
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    target = torch.zeros(x.shape[0], *x.shape[2:], dtype=torch.long, device=x.device)

    def train() -> None:
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), target).backward()
        opt.step()

    return train


def _child(spec: str) -> None:
    """Subprocess entry: build, warm up on a small input, measure one call's peak memory."""
    import resource

    import torch

    s = json.loads(spec)
    if s["cap_bytes"] and s["device"] == "cpu":
        resource.setrlimit(resource.RLIMIT_AS, (s["cap_bytes"], s["cap_bytes"]))
    torch.set_num_threads(s["threads"])
    device = torch.device(s["device"])
    model = _build(s["model"], s["preset"], s["in_ch"], s["out_ch"], s["extra"]).to(device)
    small = torch.zeros(1, s["in_ch"], *[2 * s["multiple"]] * 3, device=device)  # > 1 voxel at the bottleneck
    _step_fn(model, small, s["mode"])()  # one-off costs (thread pools, kernel builds) paid here
    x = torch.randn(1, s["in_ch"], *[s["size"]] * 3, device=device)
    fn = _step_fn(model, x, s["mode"])
    from mz_kernels.measure import PeakMemory

    try:
        with PeakMemory(device) as pm:
            fn()
        out = {"peak_bytes": pm.peak_bytes, "method": pm.method}
    except (MemoryError, RuntimeError) as e:
        if not isinstance(e, MemoryError) and "alloc" not in str(e).lower() and "memory" not in str(e).lower():
            raise
        out = {"peak_bytes": None, "oom": True}
    print(_TAG + json.dumps(out), flush=True)


def peak_memory(model: str, preset: str, size: int, mode: str, *, in_ch: int, out_ch: int, multiple: int,
                device: str, threads: int, cap_gb: float, extra: dict[str, Any] | None = None,
                timeout: float = 3600.0) -> dict[str, Any]:
    """Peak memory of one ``mode`` (``"infer"`` or ``"train"``) call in a fresh subprocess
    (``extra``: constructor keyword arguments beyond the preset)."""
    spec = json.dumps(dict(model=model, preset=preset, size=size, mode=mode, in_ch=in_ch, out_ch=out_ch, extra=extra or {},
                           multiple=multiple, device=device, threads=threads, cap_bytes=int(cap_gb * 2**30)))
    code = "import sys; from mz_pipelines.medseg.bench import _child; _child(sys.argv[1])"
    from mz_kernels.measure import last_error_line, run_measurement_child

    result, proc = run_measurement_child(code, spec, _TAG, timeout=timeout)
    if result is not None:
        return result
    if proc.returncode < 0 or "MemoryError" in proc.stderr or "alloc" in proc.stderr.lower():
        return {"peak_bytes": None, "oom": True}
    raise RuntimeError(f"memory subprocess for {model} {size}^3 {mode} failed: {last_error_line(proc)}")


def baseline_row(rows: list[dict[str, Any]], base: str, row: dict[str, Any]) -> dict[str, Any] | None:
    """The row ``row`` is compared with: the baseline at the same size with the same settings (label
    suffix such as ``+ckpt`` or ``+lean+ckpt``) when it was measured that way (like for like), else
    the baseline's other rows, its plain one first."""
    suffix = "+" + row["model"].partition("+")[2] if "+" in row["model"] else ""
    same = [q for q in rows if q["size"] == row["size"] and q["model"].partition("+")[0] == base]
    for want in (base + suffix, base):
        b = next((q for q in same if q["model"] == want), None)
        if b is not None:
            return b
    return same[0] if same else None


def fit_exponent(voxels: list[float], values: list[float | None]) -> float | None:
    """Least-squares slope of log(value) against log(voxels) (``None`` with fewer than 2 points)."""
    pts = [(math.log(v), math.log(y)) for v, y in zip(voxels, values) if y]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    den = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / den if den else None


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from mz_pipelines.runtime.bench import compare, environment
    from mz_pipelines.runtime.distributed import resolve_device
    from mz_pipelines.runtime.progress import Progress

    from .models.flops import count_flops
    from .models.registry import input_multiple

    device = resolve_device(args.device)
    torch.set_num_threads(args.threads)
    rows_spec = expand_models(args.models, args.preset, getattr(args, "use_checkpoint", "off"),
                              getattr(args, "block_impl", "registered"))
    labels = [r[0] for r in rows_spec]
    models = [(n, p, extra) for _, n, p, extra in rows_spec]
    mults = {lab: input_multiple(n, 3, p) for lab, (n, p, _) in zip(labels, models)}
    for size in args.sizes:
        bad = [lab for lab in labels if size % mults[lab]]
        if bad:
            raise ValueError(f"--sizes: {size} is not a multiple of the stride of {bad} ({[mults[b] for b in bad]})")
        small = [lab for lab in labels if size < 2 * mults[lab]]
        if small:  # the deepest level must keep more than one voxel for instance norm in training
            raise ValueError(f"--sizes: {size} must be at least twice the stride of {small} ({[2 * mults[b] for b in small]})")
    rows: list[dict[str, Any]] = []
    steps = len(args.sizes) * len(models) * (2 + (0 if args.no_memory else 2))
    progress = Progress(steps, enabled=not args.quiet)
    done = 0
    for size in args.sizes:
        built = {lab: _build(n, p, args.in_channels, args.out_channels, extra).to(device)
                 for lab, (n, p, extra) in zip(labels, models)}
        x = torch.randn(1, args.in_channels, size, size, size, device=device)
        for mode in ("infer", "train"):
            fns = {lab: _step_fn(m, x, mode) for lab, m in built.items()}
            timed = {m.name: m for m in compare(fns, group=f"{size}^3 {mode}", warmup=args.warmup,
                                                repeat=args.repeat, device=device, memory=False)}
            for lab in fns:
                done += 1
                progress.advance(done)
                row = next((r for r in rows if r["model"] == lab and r["size"] == size), None)
                if row is None:
                    m = built[lab]
                    with torch.no_grad():
                        fl = count_flops(m.eval(), x)
                    row = {"model": lab, "size": size, "voxels": size**3,
                           "params_M": sum(p.numel() for p in m.parameters()) / 1e6,
                           "gflops": fl["total"] / 1e9, "scan_gflops": fl["scan"] / 1e9}
                    rows.append(row)
                row[f"{mode}_ms"] = timed[lab].median_ms
        del built, fns
        if not args.no_memory:
            for lab, (n, p, extra) in zip(labels, models):
                for mode in ("infer", "train"):
                    mem = peak_memory(n, p, size, mode, in_ch=args.in_channels, out_ch=args.out_channels, extra=extra,
                                      multiple=mults[lab], device=str(device), threads=args.threads, cap_gb=args.mem_cap_gb)
                    row = next(r for r in rows if r["model"] == lab and r["size"] == size)
                    row[f"{mode}_mem_MiB"] = None if mem.get("peak_bytes") is None else mem["peak_bytes"] / 2**20
                    row[f"{mode}_oom"] = bool(mem.get("oom"))
                    done += 1
                    progress.advance(done)
    progress.close()
    breakdown = {}
    if getattr(args, "breakdown", 0):
        plain = [(lab, m) for lab, m in zip(labels, models) if not m[2].get("use_checkpoint")]  # hooks cannot see inside checkpoints
        breakdown = saved_breakdown([lab for lab, _ in plain], [m for _, m in plain], min(args.sizes), args.breakdown,
                                    args.in_channels, args.out_channels, device)
    base = f"{args.baseline}:{args.preset}" if ":" not in args.baseline else args.baseline
    for r in rows:
        b = baseline_row(rows, base, r)
        for key in ("infer_ms", "train_ms", "infer_mem_MiB", "train_mem_MiB"):
            if b is not None and r.get(key) and b.get(key):
                r[f"{key}_x"] = r[key] / b[key]
    scaling = {}
    for lab in labels:
        mine = sorted((r for r in rows if r["model"] == lab), key=lambda r: r["size"])
        vox = [r["voxels"] for r in mine]
        scaling[lab] = {k: fit_exponent(vox, [r.get(k) for r in mine]) for k in ("infer_ms", "train_ms", "infer_mem_MiB", "train_mem_MiB", "gflops")}
    return {"meta": {**environment(device), "threads": args.threads, "batch": 1, "in_channels": args.in_channels,
                     "out_channels": args.out_channels, "baseline": base,
                     "use_checkpoint": getattr(args, "use_checkpoint", "off"),
                     "block_impl": getattr(args, "block_impl", "registered")},
            "rows": rows, "scaling": scaling, **({"breakdown": breakdown} if breakdown else {})}


def saved_breakdown(labels: list[str], models: list[tuple[str, str, dict[str, Any]]], size: int, depth: int, in_ch: int, out_ch: int,
                    device: Any) -> dict[str, Any]:
    """Per model: MiB saved for backward by each module (names cut to ``depth`` parts) in one
    training forward at ``size``^3 (:func:`mz_pipelines.runtime.saved_memory.saved_bytes_by_module`)."""
    import torch

    from mz_pipelines.runtime.saved_memory import saved_bytes_by_module

    out: dict[str, Any] = {"size": size, "depth": depth, "models": {}}
    for lab, (n, p, extra) in zip(labels, models):
        model = _build(n, p, in_ch, out_ch, extra).to(device).train()
        x = torch.randn(1, in_ch, size, size, size, device=device)
        per = saved_bytes_by_module(model, lambda m=model, x=x: m(x).float().mean(), depth=depth)
        out["models"][lab] = {"total_MiB": sum(per.values()) / 2**20, "modules_MiB": {k: v / 2**20 for k, v in per.items()}}
    return out


def format_report(report: dict[str, Any]) -> str:
    from mz_pipelines.runtime.bench import format_table

    def f(v: Any, nd: int = 1) -> Any:
        return None if v is None else round(v, nd)

    table = []
    for r in report["rows"]:
        mem = lambda k: "OOM" if r.get(f"{k}_oom") else f(r.get(f"{k}_mem_MiB"), 0)  # noqa: E731
        table.append({
            "model": r["model"], "size": f"{r['size']}^3", "params M": f(r["params_M"], 2), "GFLOPs": f(r["gflops"]),
            "scan GF": f(r["scan_gflops"], 2), "infer ms": f(r.get("infer_ms"), 0), "train ms": f(r.get("train_ms"), 0),
            "infer MiB": mem("infer"), "train MiB": mem("train"),
            "infer x": f(r.get("infer_ms_x"), 2), "train x": f(r.get("train_ms_x"), 2),
            "inf mem x": f(r.get("infer_mem_MiB_x"), 2), "trn mem x": f(r.get("train_mem_MiB_x"), 2),
        })
    lines = [format_table(table), "", f"ratios x: against {report['meta']['baseline']} at the same size"
             " (+ckpt rows: activation checkpointing, +lean/+monai: decoder block implementation;"
             " against the baseline's row with the same suffix when it has one)",
             "scaling exponent k (cost ~ voxels^k):"]
    for lab, s in report["scaling"].items():
        fitted = ", ".join(f"{k} {v:.2f}" for k, v in s.items() if v is not None)
        lines.append(f"  {lab}: {fitted or 'needs two or more sizes'}")
    bd = report.get("breakdown")
    if bd:
        lines += ["", f"saved for backward in one training forward at {bd['size']}^3 (MiB; modules >= 2% shown):"]
        for lab, m in bd["models"].items():
            total = m["total_MiB"]
            parts = [f"{k} {v:.0f}" for k, v in m["modules_MiB"].items() if total and v >= 0.02 * total]
            lines.append(f"  {lab}: total {total:.0f}: " + ", ".join(parts))
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mz_pipelines.runtime.files import atomic_open

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for lab in report["scaling"]:
        mine = sorted((r for r in report["rows"] if r["model"] == lab), key=lambda r: r["size"])
        vox = [r["voxels"] for r in mine]
        for key, ax, style in (("infer_ms", axes[0], "-o"), ("train_ms", axes[0], "--s"),
                               ("infer_mem_MiB", axes[1], "-o"), ("train_mem_MiB", axes[1], "--s")):
            pts = [(v, r.get(key)) for v, r in zip(vox, mine) if r.get(key)]
            if pts:
                ax.plot(*zip(*pts), style, label=f"{lab} {key.split('_')[0]}")
    for ax, title in zip(axes, ("time per call (ms)", "peak memory (MiB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("voxels")
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_open(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=120)
    plt.close(fig)
    return path
