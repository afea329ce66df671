"""Benchmark harness shared by every ``bench`` verb: warm-up, repeated timing, peak memory, ratios
between candidates measured in the same run, a table printer and JSON output.

Candidates of one case are timed round-robin (call A, call B, call A, ...), so drift on a busy
machine affects them alike and their ratio is meaningful. Peak memory is measured in one extra
call per candidate with :class:`mz_kernels.measure.PeakMemory` (CUDA ``max_memory_allocated``;
on Linux CPUs the growth of the peak resident set, which misses allocations the allocator serves
from memory it already holds, so treat in-process CPU numbers as approximate).

Examples:
    >>> ms = compare({"loop": f_loop, "conv": f_conv}, group="L=256", warmup=2, repeat=5)
    >>> report = BenchReport(ms, baseline="loop")
    >>> print(report.table()); report.write_json("bench.json")
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mz_kernels.measure import PeakMemory

from .files import write_json

if TYPE_CHECKING:  # torch is imported where it is used: building a bench parser stays torch-free
    import torch

def _sync(device: torch.device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Measurement:
    """Timings (ms, one per repeat) and peak memory of one candidate on one case."""

    name: str
    group: str
    times_ms: list[float]
    peak_mem_bytes: int | None = None
    mem_method: str = ""
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms)

    @property
    def mean_ms(self) -> float:
        return statistics.fmean(self.times_ms)

    @property
    def std_ms(self) -> float:
        return statistics.stdev(self.times_ms) if len(self.times_ms) > 1 else 0.0

    @property
    def min_ms(self) -> float:
        return min(self.times_ms)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "group": self.group,
            "params": self.params,
            "median_ms": self.median_ms,
            "mean_ms": self.mean_ms,
            "std_ms": self.std_ms,
            "min_ms": self.min_ms,
            "times_ms": self.times_ms,
            "peak_mem_bytes": self.peak_mem_bytes,
            "mem_method": self.mem_method,
        }


def compare(
    candidates: Mapping[str, Callable[[], object]],
    *,
    group: str = "",
    warmup: int = 3,
    repeat: int = 10,
    device: torch.device | str = "cpu",
    memory: bool = True,
    params: Mapping[str, Any] | None = None,
) -> list[Measurement]:
    """Time every candidate on one case, round-robin, in this process.

    Args:
        candidates: name -> zero-argument callable doing one unit of work (inputs prepared outside).
        group: case label, e.g. ``"L=256"``; ratios are taken within a group.
        warmup: untimed calls per candidate first (compilation, caches, allocator).
        repeat: timed calls per candidate.
        device: where the work runs (CUDA is synchronised around every call).
        memory: also measure peak memory in one extra call per candidate.
        params: case parameters stored with each measurement (JSON output).
    """
    import torch

    if not candidates:
        raise ValueError("compare: candidates must not be empty")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"compare: warmup must be an int >= 0, got {warmup!r}")
    if isinstance(repeat, bool) or not isinstance(repeat, int) or repeat < 1:
        raise ValueError(f"compare: repeat must be an int >= 1, got {repeat!r}")
    dev = torch.device(device)
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    _sync(dev)
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeat):
        for name, fn in candidates.items():
            _sync(dev)
            t0 = time.perf_counter()
            fn()
            _sync(dev)
            times[name].append((time.perf_counter() - t0) * 1e3)
    out = []
    for name, fn in candidates.items():
        peak, method = None, ""
        if memory:
            with PeakMemory(dev) as pm:
                fn()
            peak, method = pm.peak_bytes, pm.method
        out.append(Measurement(name, group, times[name], peak, method, dict(params or {})))
    return out


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """Plain-text table: a header, a rule, one line per row; numbers right-aligned.

    Examples:
        >>> print(format_table([{"name": "a", "ms": 1.5}, {"name": "bb", "ms": 12.25}]))
        name     ms
        ----  -----
        a       1.5
        bb    12.25
    """
    if not rows:
        return ""
    cols = list(columns) if columns is not None else list(rows[0])
    cells = [["" if r.get(c) is None else str(r.get(c)) for c in cols] for r in rows]
    numeric = [all(isinstance(r.get(c), (int, float)) or r.get(c) is None for r in rows) for c in cols]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()

    return "\n".join([line(cols), line(["-" * w for w in widths]), *(line(row) for row in cells)])


def environment(device: torch.device | str = "cpu") -> dict[str, Any]:
    """Where the numbers come from: versions, device, threads, time."""
    import torch

    dev = torch.device(device)
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


@dataclass
class BenchReport:
    """Measurements of several candidates over several cases, with ratios to ``baseline``."""

    measurements: list[Measurement]
    baseline: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        names = {m.name for m in self.measurements}
        if self.baseline is not None and self.baseline not in names:
            raise ValueError(f"BenchReport: baseline must be one of {sorted(names)}, got {self.baseline!r}")

    def ratio(self, m: Measurement) -> float | None:
        """``median(m) / median(baseline)`` on the same case (``None`` without a baseline there)."""
        for b in self.measurements:
            if b.name == self.baseline and b.group == m.group:
                return m.median_ms / b.median_ms
        return None

    def rows(self) -> list[dict[str, Any]]:
        rows = []
        for m in self.measurements:
            ratio = self.ratio(m)
            rows.append(
                {
                    "case": m.group,
                    "candidate": m.name,
                    "median ms": round(m.median_ms, 3),
                    "mean ms": round(m.mean_ms, 3),
                    "std ms": round(m.std_ms, 3),
                    "min ms": round(m.min_ms, 3),
                    "peak MiB": None if m.peak_mem_bytes is None else round(m.peak_mem_bytes / 2**20, 2),
                    f"x {self.baseline}" if self.baseline else "ratio": None if ratio is None else round(ratio, 3),
                }
            )
        return rows

    def table(self) -> str:
        """The measurements as a text table (ratio column relative to the baseline)."""
        rows = self.rows()
        cols = list(rows[0]) if rows else []
        if not self.baseline:
            cols = cols[:-1]
        return format_table(rows, cols)

    def to_dict(self) -> dict[str, Any]:
        return {
            "meta": self.meta,
            "baseline": self.baseline,
            "results": [{**m.to_dict(), "ratio_to_baseline": self.ratio(m)} for m in self.measurements],
        }

    def write_json(self, path: str | os.PathLike[str]) -> Path:
        return write_json(path, self.to_dict())


def int_at_least(low: int) -> Callable[[str], int]:
    """argparse ``type=`` for integers ``>= low`` (bad values become one-line usage errors)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
        return value

    return parse


def add_bench_arguments(parser: argparse.ArgumentParser, *, warmup: int = 3, repeat: int = 10) -> None:
    """The options every ``bench`` verb shares: ``--warmup --repeat --device --json --no-memory``."""
    g = parser.add_argument_group("benchmark")
    g.add_argument("--warmup", type=int_at_least(0), default=warmup, help=f"untimed calls per candidate (default {warmup})")
    g.add_argument("--repeat", type=int_at_least(1), default=repeat, help=f"timed calls per candidate (default {repeat})")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="where to run (default auto)")
    g.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    g.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
