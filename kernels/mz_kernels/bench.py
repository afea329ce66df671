"""``mambazoo bench kernels``: time the selective-scan backends on the shapes of the model families.

For each shape and backend it measures, in one process and one run:

* forward time (``torch.no_grad``) and forward+backward time (``torch.autograd.grad`` of ``y`` with a
  fixed random cotangent): the median of ``--repeat`` timed calls after ``--warmup`` untimed ones
  (``ref`` uses ``--ref-repeat`` and no warm-up; any backend stops early once ``--budget`` seconds of
  timed calls were spent, so slow calls of seconds each are timed once or twice);
* state elements per second, ``B * L * D * N / forward time``;
* speed-up over ``ref`` (``ref`` time / backend time, forward and forward+backward);
* the fraction of the machine's ``torch.exp`` rate: ``torch.exp(x, out=buf)`` on a float32 tensor of
  ``B * L * D * N`` elements (at most 2**26), timed in the same run (one exponential per state element
  is the CPU floor of the scan), and the same against ``torch.exp(x)``, which like the scan allocates
  its output (large fresh outputs pay first-touch page faults, which dominate at N = 1);
* peak memory: on CPU, the peak of bytes held by tensors allocated during one call (outputs included,
  inputs and the C kernel's per-thread scratch of at most ~1 MB excluded), read from
  ``torch.profiler`` memory events; on CUDA, ``torch.cuda.max_memory_allocated`` above the baseline;
* the relative error of ``y`` against ``ref`` (float32, same inputs).

With ``--device cuda`` it runs :mod:`mz_kernels.bench_gpu` instead: ``triton`` against ``chunked``
in bfloat16 on the reference table's GPU shapes, CUDA-event timing with the L2 flushed, achieved
bytes/s and the fraction of the memory/exp floor, and the issue's targets checked under the table.

Examples:
    mambazoo bench kernels
    mambazoo bench kernels --device cuda --shapes eeg,ssd --json gpu.json
    mambazoo bench kernels --shapes vim_t,2x67x32x4x2 --backends cpu,ref --repeat 3 --json out.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from ._backend import backend_status
from .selective_scan import selective_scan
from .testing import make_scan_inputs, rel_err

_EXP_CAP = 1 << 26


@dataclass(frozen=True)
class Shape:
    """One benchmark problem: ``u [batch, length, dim]``, ``B/C [batch, length, groups, d_state]``."""

    name: str
    batch: int
    length: int
    dim: int
    d_state: int
    groups: int
    gate: bool
    note: str

    @property
    def elements(self) -> int:
        return self.batch * self.length * self.dim * self.d_state


SHAPES = {
    s.name: s
    for s in (
        Shape("vim_t", 8, 197, 768, 16, 2, True, "Vim-T bidirectional, 2 x 384 channels"),
        Shape("vmamba_t_s1", 8, 3136, 384, 1, 4, False, "VMamba-T stage 1, 4 directions x 96, d_state 1, no gate"),
        Shape("eeg", 32, 80, 1540, 16, 1, True, "EEG windows"),
        Shape("audio", 4, 2048, 768, 16, 1, True, "audio frames"),
    )
}


def parse_shape(spec: str) -> Shape:
    """A name from :data:`SHAPES` or ``BxLxDxN[xG]`` (gated), e.g. ``2x67x32x4x2``."""
    if spec in SHAPES:
        return SHAPES[spec]
    try:
        nums = [int(p) for p in spec.lower().split("x")]
    except ValueError:
        nums = []
    if len(nums) not in (4, 5) or min(nums) < 1:
        raise ValueError(f"bench kernels: --shapes entries must be one of {list(SHAPES)} or BxLxDxN[xG], got {spec!r}")
    B, L, D, N, G = (*nums, 1) if len(nums) == 4 else nums
    if D % G:
        raise ValueError(f"bench kernels: shape {spec!r}: D = {D} must be divisible by G = {G}")
    return Shape(spec, B, L, D, N, G, True, "custom")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def _median_time(fn: Callable[[], object], repeat: int, warmup: int, device: torch.device, budget: float) -> float:
    """Median of up to ``repeat`` timed calls after ``warmup`` untimed ones; slow calls (seconds each)
    stop early: one warm-up call is enough, and timing stops once ``budget`` seconds were spent."""
    for _ in range(warmup):
        if _timed(fn, device) > budget / 10:
            break
    times: list[float] = []
    while len(times) < repeat and sum(times) < budget:
        times.append(_timed(fn, device))
    return statistics.median(times)


def _peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes of tensors allocated while ``fn`` runs (see module docstring)."""
    if device.type == "cuda":
        _sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    import warnings

    from torch.profiler import ProfilerActivity, profile

    os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # the profiler's "no GPU" chatter on CPU-only machines
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
    events = sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
    )
    cur = peak = 0
    for _, nbytes in events:
        cur += nbytes
        peak = max(peak, cur)
    return peak


def exp_rates(shape: Shape, device: torch.device, repeat: int) -> tuple[float, float]:
    """Elements per second of ``torch.exp`` on ``min(B*L*D*N, 2**26)`` float32 elements: into a
    preallocated buffer (``out=``), and allocating its output (first-touch page faults included)."""
    n = min(shape.elements, _EXP_CAP)
    x = torch.rand(n, device=device) * -8.0
    out = torch.empty_like(x)
    t_out = _median_time(lambda: torch.exp(x, out=out), max(3, repeat), 1, device, 10.0)
    del out
    t_alloc = _median_time(lambda: torch.exp(x), max(3, repeat), 1, device, 10.0)
    return n / t_out, n / t_alloc


def _measure(shape: Shape, backend: str, device: torch.device, repeat: int, warmup: int, memory: bool, budget: float) -> dict:
    ins = make_scan_inputs(shape.batch, shape.length, shape.dim, shape.d_state, shape.groups, gate=shape.gate, device=device)
    gen = torch.Generator().manual_seed(7)
    cot = torch.randn(shape.batch, shape.length, shape.dim, generator=gen).to(device)
    fwd_in = ins.cast(torch.float32, requires_grad=False).kwargs()
    grad_ins = ins.cast(torch.float32, requires_grad=True)
    leaves = [t for t in grad_ins.tensors() if t is not None]

    def fwd():
        with torch.no_grad():
            return selective_scan(**fwd_in, backend=backend)[0]

    def fwd_bwd():
        y = selective_scan(**grad_ins.kwargs(), backend=backend)[0]
        return torch.autograd.grad(y, leaves, cot)

    row = {
        "fwd_s": _median_time(fwd, repeat, warmup, device, budget),
        "fwdbwd_s": _median_time(fwd_bwd, repeat, warmup, device, budget),
        "y": fwd().float().cpu(),
    }
    if memory:
        row["peak_fwd_bytes"] = _peak_bytes(fwd, device)
        row["peak_fwdbwd_bytes"] = _peak_bytes(fwd_bwd, device)
    return row


def run(
    shapes: list[Shape],
    backends: list[str],
    device: torch.device,
    repeat: int,
    warmup: int,
    ref_repeat: int,
    memory: bool,
    budget: float = 20.0,
    log: Callable[[str], None] = lambda s: None,
) -> dict:
    """Measure every (shape, backend); returns the JSON-able report (see :func:`main`)."""
    status = backend_status()
    rows = []
    rates, rates_alloc = {}, {}
    tiny = make_scan_inputs(1, 4, 16, 2, device=device).cast(torch.float32, requires_grad=False).kwargs()
    for backend in backends:  # first calls pay one-off costs (op registration, kernel build)
        if status.get(backend) is None and not (backend == "cpu" and device.type != "cpu"):
            try:
                selective_scan(**tiny, backend=backend)
            except Exception:  # reported per shape below
                pass
    for shape in shapes:
        rates[shape.name], rates_alloc[shape.name] = exp_rates(shape, device, repeat)
        results: dict[str, dict] = {}
        for backend in backends:
            base = {"shape": shape.name, "backend": backend, **{k: v for k, v in asdict(shape).items() if k != "name"}}
            reason = status.get(backend)
            if reason is None and backend == "cpu" and device.type != "cpu":
                reason = "needs CPU tensors"
            if reason is not None:
                rows.append({**base, "status": f"unavailable: {reason}"})
                continue
            log(f"  {shape.name} / {backend} ...")
            is_ref = backend == "ref"
            try:
                res = _measure(shape, backend, device, ref_repeat if is_ref else repeat, 0 if is_ref else warmup, memory, budget)
            except Exception as e:  # report and keep benchmarking the others
                rows.append({**base, "status": f"error: {type(e).__name__}: {e}".splitlines()[0]})
                continue
            results[backend] = res
            rows.append({**base, "status": "ok", **{k: v for k, v in res.items() if k != "y"}})
        ref = results.get("ref")
        for row in rows:
            if row["shape"] != shape.name or row["status"] != "ok":
                continue
            res = results[row["backend"]]
            row["fwd_elem_per_s"] = shape.elements / row["fwd_s"]
            row["exp_fraction"] = row["fwd_elem_per_s"] / rates[shape.name]
            row["exp_alloc_fraction"] = row["fwd_elem_per_s"] / rates_alloc[shape.name]
            if ref is not None:
                row["speedup_fwd"] = ref["fwd_s"] / row["fwd_s"]
                row["speedup_fwdbwd"] = ref["fwdbwd_s"] / row["fwdbwd_s"]
                row["y_rel_err"] = rel_err(res["y"], ref["y"])
    return {
        "machine": {
            "platform": platform.platform(),
            "processor": _cpu_name(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        },
        "settings": {"repeat": repeat, "warmup": warmup, "ref_repeat": ref_repeat, "memory": memory, "budget_s": budget},
        "exp_elem_per_s": rates,
        "exp_alloc_elem_per_s": rates_alloc,
        "shapes": {s.name: asdict(s) for s in shapes},
        "rows": rows,
    }


def format_table(report: dict) -> str:
    """Human-readable table of a :func:`run` report."""

    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    head = (
        f"{'shape':<14}{'backend':<9}{'fwd ms':>9}{'f+b ms':>10}{'Gelem/s':>9}{'x ref':>8}{'x ref f+b':>10}"
        f"{'x exp':>7}{'x exp(a)':>9}{'mem fwd MB':>11}{'mem f+b MB':>11}{'y err':>9}"
    )
    lines = [head, "-" * len(head)]
    mb = 1 / 2**20
    for r in report["rows"]:
        if r["status"] != "ok":
            lines.append(f"{r['shape']:<14}{r['backend']:<9}  {r['status']}")
            continue
        g = r.get
        lines.append(
            f"{r['shape']:<14}{r['backend']:<9}{r['fwd_s'] * 1e3:>9.2f}{r['fwdbwd_s'] * 1e3:>10.2f}"
            f"{r['fwd_elem_per_s'] / 1e9:>9.3f}{f(g('speedup_fwd'), '.1f'):>8}{f(g('speedup_fwdbwd'), '.1f'):>10}"
            f"{r['exp_fraction']:>7.2f}{r['exp_alloc_fraction']:>9.2f}"
            f"{f(None if g('peak_fwd_bytes') is None else g('peak_fwd_bytes') * mb, '.1f'):>11}"
            f"{f(None if g('peak_fwdbwd_bytes') is None else g('peak_fwdbwd_bytes') * mb, '.1f'):>11}"
            f"{f(g('y_rel_err'), '.1e'):>9}"
        )
    lines.append("")
    lines.append("x ref: ref time / time.  x exp: forward state elements (B*L*D*N) per second / elements per second of")
    lines.append("torch.exp(x, out=buf); x exp(a): the same against torch.exp(x), which also allocates its output.")
    lines.append("mem: peak bytes of tensors allocated during one call (outputs included, inputs excluded).")
    for name, rate in report["exp_elem_per_s"].items():
        s = report["shapes"][name]
        lines.append(
            f"  {name:<14}torch.exp {rate / 1e9:.3f} Gelem/s (out=), {report['exp_alloc_elem_per_s'][name] / 1e9:.3f} (allocating)"
            f"   B={s['batch']} L={s['length']} D={s['dim']} N={s['d_state']} G={s['groups']}: {s['note']}"
        )
    m = report["machine"]
    lines.append(f"machine: {m['processor']}, torch {m['torch']}, {m['threads']} threads, device {m['device']}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mambazoo bench kernels", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--shapes", default=None,
        help=f"comma list of {list(SHAPES)} or BxLxDxN[xG] (default: all); on cuda: the GPU table's names, "
        "BxLxDxN[xG] or ssd:BxLxHxPxN[xG] (default: all GPU shapes)",
    )
    p.add_argument("--backends", default=None, help="comma list of ref,chunked,cpu,triton (default: ref,chunked,cpu; on cuda: triton,chunked)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores available to this process)")
    p.add_argument("--repeat", type=int, default=None, help="timed calls per measurement (median; default 10, 20 on cuda)")
    p.add_argument("--flush-mb", type=int, default=256, help="cuda: MB written before each timed call to flush L2")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls before timing")
    p.add_argument("--ref-repeat", type=int, default=3, help="timed calls for the slow ref backend (no warm-up; --budget applies)")
    p.add_argument("--budget", type=float, default=20.0, help="seconds of timed calls per measurement before stopping early")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the full report as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``mambazoo bench kernels``; returns the exit status (1 if a backend errored)."""
    args = build_parser().parse_args(argv)
    try:
        device = torch.device(args.device or "cpu")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("bench kernels: --device cuda requested but CUDA is not available")
        if device.type == "cuda":
            return _main_cuda(args, device)
        args.repeat = 10 if args.repeat is None else args.repeat
        shapes = [parse_shape(s.strip()) for s in (args.shapes or ",".join(SHAPES)).split(",") if s.strip()]
        default = ["ref", "chunked", "cpu"] + (["triton"] if device.type == "cuda" else [])
        backends = [b.strip() for b in args.backends.split(",")] if args.backends else default
        for b in backends:
            if b not in ("ref", "chunked", "cpu", "triton"):
                raise ValueError(f"bench kernels: --backends entries must be in ['ref', 'chunked', 'cpu', 'triton'], got {b!r}")
        for name in ("repeat", "ref_repeat", "threads"):
            v = getattr(args, name)
            if v is not None and v < 1:
                raise ValueError(f"bench kernels: --{name.replace('_', '-')} must be >= 1, got {v}")
        if args.warmup < 0:
            raise ValueError(f"bench kernels: --warmup must be >= 0, got {args.warmup}")
        if not args.budget > 0:
            raise ValueError(f"bench kernels: --budget must be > 0 seconds, got {args.budget}")
    except ValueError as e:
        print(str(e))
        return 2
    threads = args.threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    torch.set_num_threads(threads)
    print(f"benchmarking {[s.name for s in shapes]} x {backends} on {device}, {threads} threads ...", flush=True)
    report = run(
        shapes, backends, device, args.repeat, args.warmup, args.ref_repeat, not args.no_memory, args.budget,
        log=lambda s: print(s, flush=True),
    )
    print(format_table(report))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(report, fh, indent=2, default=lambda v: None if isinstance(v, float) and not math.isfinite(v) else str(v))
        print(f"wrote {args.json}")
    return 1 if any(r["status"].startswith("error") for r in report["rows"]) else 0


def _main_cuda(args: argparse.Namespace, device: torch.device) -> int:
    """``--device cuda``: Triton against ``chunked`` in bfloat16 (see :mod:`mz_kernels.bench_gpu`)."""
    from . import bench_gpu

    names = args.shapes or ",".join(bench_gpu.GPU_SHAPES)
    shapes = [bench_gpu.parse_gpu_shape(s.strip()) for s in names.split(",") if s.strip()]
    backends = [b.strip() for b in args.backends.split(",")] if args.backends else list(bench_gpu.GPU_BACKENDS)
    for b in backends:
        if b not in bench_gpu.GPU_BACKENDS:
            raise ValueError(f"bench kernels: --backends entries on cuda must be in {list(bench_gpu.GPU_BACKENDS)}, got {b!r}")
    repeat = 20 if args.repeat is None else args.repeat
    if repeat < 1 or args.warmup < 0 or args.flush_mb < 0:
        raise ValueError(
            f"bench kernels: need --repeat >= 1, --warmup >= 0, --flush-mb >= 0, got {repeat}, {args.warmup}, {args.flush_mb}"
        )
    if device.index is not None:
        torch.cuda.set_device(device)
    print(f"benchmarking {[s.name for s in shapes]} x {backends} on {torch.cuda.get_device_name()} ...", flush=True)
    report = bench_gpu.run_gpu(
        shapes, backends, repeat=repeat, warmup=args.warmup, flush_bytes=args.flush_mb << 20,
        memory=not args.no_memory, log=lambda s: print(s, flush=True),
    )
    print(bench_gpu.format_gpu_table(report))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(report, fh, indent=2, default=str)
        print(f"wrote {args.json}")
    return 1 if any(r["status"].startswith("error") for r in report["rows"]) else 0
