"""GPU mode of ``mambazoo bench kernels --device cuda``: Triton kernels against ``chunked`` and the floor.

For each shape (default: the reference table's, in bfloat16 with float32 state) and backend
(``triton``, ``chunked``) it measures forward and forward+backward time with CUDA events (median of
``repeat`` calls after ``warmup``, L2 flushed before each by writing ``flush_bytes``), the peak of
``torch.cuda.max_memory_allocated`` above the baseline, and compares with the floor

    floor_s = max(HBM bytes / copy bandwidth, exponentials / exp rate)

where bytes and exponentials come from :func:`traffic` (a pure model, see its docstring), the copy
bandwidth is a device-to-device copy of 1 GiB and the exp rate is a Triton kernel doing 256 dependent
``exp2`` per loaded float (compute-bound). ``torch.exp(x, out=y)`` on 2**28 floats is reported too,
but it is memory-bound on a GPU (8 bytes per exponential), so it is not used for the floor.

Only :func:`time_cuda`, :func:`copy_bandwidth`, :func:`exp_rate` and :func:`run_gpu` need a GPU;
the shape list, the model, the floor, the target checks and the table are plain arithmetic.
"""
from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from ._validate import check_choice, check_positive_int
from .selective_scan import selective_scan
from .selective_scan._common import CKPT
from .ssd import ssd_scan
from .testing import make_scan_inputs

GPU_BACKENDS = ("triton", "chunked")
DTYPE_BYTES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}
_EXP_REPS = 256  # dependent exp2 per loaded float in the exp-rate kernel


@dataclass(frozen=True)
class GpuShape:
    """One GPU problem. ``kind="scan"``: ``selective_scan`` with ``u [batch, length, dim]``,
    ``B/C [batch, length, groups, d_state]``. ``kind="ssd"``: ``ssd_scan`` with ``x [batch, length,
    heads, headdim]`` (``dim = heads * headdim``), ``B/C [batch, length, groups, d_state]``."""

    name: str
    kind: str
    batch: int
    length: int
    dim: int
    d_state: int
    groups: int = 1
    gate: bool = True
    heads: int = 0
    headdim: int = 0
    chunk: int = 64
    note: str = "custom"

    @property
    def elements(self) -> int:
        """State elements per call: ``B * L * D * N`` (``D = H * P`` for SSD)."""
        return self.batch * self.length * self.dim * self.d_state


GPU_SHAPES = {
    s.name: s
    for s in (
        GpuShape("vmamba_t_s1", "scan", 64, 3136, 4 * 96, 1, 4, False, note="VMamba-T stage 1, 4 directions folded in G"),
        GpuShape("vmamba_t_s3", "scan", 64, 196, 4 * 384, 1, 4, False, note="VMamba-T stage 3, 4 directions folded in G"),
        GpuShape("vim_s_bi", "scan", 64, 197, 2 * 768, 16, 2, True, note="Vim-S bidirectional, 2 directions in G"),
        GpuShape("segmamba_3d", "scan", 2, 32768, 3 * 192, 16, 3, True, note="3D SegMamba ToM, 3 orientations in G"),
        GpuShape("eeg", "scan", 32, 2048, 128, 16, 1, True, note="EEG"),
        GpuShape("audio", "scan", 8, 8192, 1536, 16, 1, True, note="audio frames"),
        GpuShape("ssd", "ssd", 8, 2048, 24 * 64, 128, 1, True, 24, 64, 64, note="Mamba-2 SSD, H=24 P=64, chunk 64"),
    )
}


def parse_gpu_shape(spec: str) -> GpuShape:
    """A name from :data:`GPU_SHAPES`, ``BxLxDxN[xG]`` (gated selective scan) or
    ``ssd:BxLxHxPxN[xG]`` (gated SSD, chunk 64), e.g. ``2x67x32x4x2`` or ``ssd:1x80x2x16x8``."""
    if spec in GPU_SHAPES:
        return GPU_SHAPES[spec]
    ssd = spec.lower().startswith("ssd:")
    body = spec[4:] if ssd else spec
    try:
        nums = [int(p) for p in body.lower().split("x")]
    except ValueError:
        nums = []
    lo = 5 if ssd else 4
    if len(nums) not in (lo, lo + 1) or min(nums) < 1:
        raise ValueError(
            f"bench kernels: --shapes entries on cuda must be one of {list(GPU_SHAPES)}, BxLxDxN[xG] or "
            f"ssd:BxLxHxPxN[xG], got {spec!r}"
        )
    G = nums[lo] if len(nums) > lo else 1
    if ssd:
        b, length, h, p, n = nums[:5]
        if h % G:
            raise ValueError(f"bench kernels: shape {spec!r}: H = {h} must be divisible by G = {G}")
        return GpuShape(spec, "ssd", b, length, h * p, n, G, True, h, p, 64)
    b, length, d, n = nums[:4]
    if d % G:
        raise ValueError(f"bench kernels: shape {spec!r}: D = {d} must be divisible by G = {G}")
    return GpuShape(spec, "scan", b, length, d, n, G, True)


def traffic(shape: GpuShape, dtype: torch.dtype = torch.bfloat16) -> dict[str, int]:
    """HBM bytes and exponentials of one forward and one forward+backward call (a lower-bound model).

    With ``s`` bytes per input element (``dtype``), float32 state/parameters and gradients of B, C:

    * **scan forward**: read u, delta (, z) and write y: ``(3 or 4) * B*L*D * s``; read B, C once per
      (b, l): ``2 * B*L*G*N * s``; A, D, delta_bias: ``(D*N + 2*D) * 4``; final state: ``B*D*N * 4``.
    * **scan backward** (explicit accounting): read u, delta, dout (, z) and write du, ddelta (, dz):
      ``(5 or 7) * B*L*D * s``; read B, C: ``2 * B*L*G*N * s``; write dB, dC in float32:
      ``2 * B*L*G*N * 4``; read A, D, bias and write their gradients: ``2 * (D*N + 2*D) * 4``; the
      forward of a training call also writes, and the backward reads, the chunk-start states every
      ``CKPT`` positions: ``2 * B*ceil(L/CKPT)*D*N * 4``.
    * **scan exponentials**: ``B*L*D*N`` forward (one ``exp2(delta * A)`` per state element); the
      Triton backward recomputes the chunk's forward (1) and the adjoint's decays at ``t`` and
      ``t + 1`` (2), so forward+backward is ``4 * B*L*D*N``. Per-token softplus/silu exponentials
      (at most 2 per (b, l, d)) are not counted.
    * **SSD forward**: x (, z), y: ``(2 or 3) * B*L*H*P * s``; dt: ``B*L*H * s``; B, C: ``2 * B*L*G*N * s``;
      A, dt_bias, D: ``(2*H + H*P) * 4``; the chunked algorithm writes and reads the chunk states
      ``[B, ceil(L/chunk), H, P, N]`` in float32: ``2 * states``. Backward: x, dout (, z) read and
      dx (, dz) written ``(3 or 5) * B*L*H*P * s``, dt read and ddt written ``2 * B*L*H * s``, B, C read
      ``2 * B*L*G*N * s``, dB, dC written in float32, parameters and their gradients, and the forward
      states re-read plus the adjoint states written and read (``3 * states``).
    * **SSD exponentials**: the in-chunk decay matrix ``exp(segsum)`` of ``chunk x chunk`` per chunk
      and head plus one decay per (b, l, h): ``B*L*H*(chunk + 1)``; the backward recomputes it for the
      forward and the adjoint (``3x`` in total). SSD's tensor-core FLOPs are not part of this floor.

    Returns:
        ``{"fwd_bytes", "fwdbwd_bytes", "fwd_exps", "fwdbwd_exps"}``.
    """
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"traffic: dtype must be one of {list(DTYPE_BYTES)}, got {dtype}")
    s, f = DTYPE_BYTES[dtype], 4
    b, length, n, g = shape.batch, shape.length, shape.d_state, shape.groups
    bc = 2 * b * length * g * n
    if shape.kind == "scan":
        d = shape.dim
        tok = b * length * d
        params = (d * n + 2 * d) * f
        fwd = (4 if shape.gate else 3) * tok * s + bc * s + params + b * d * n * f
        ckpt = b * math.ceil(length / CKPT) * d * n * f
        bwd = (7 if shape.gate else 5) * tok * s + bc * s + bc * f + 2 * params + ckpt
        exps = shape.elements
        return {"fwd_bytes": fwd, "fwdbwd_bytes": fwd + ckpt + bwd, "fwd_exps": exps, "fwdbwd_exps": 4 * exps}
    if shape.kind != "ssd":
        raise ValueError(f"traffic: shape.kind must be 'scan' or 'ssd', got {shape.kind!r}")
    h, p = shape.heads, shape.headdim
    tok, hd = b * length * h * p, b * length * h
    params = (2 * h + h * p) * f
    states = b * math.ceil(length / shape.chunk) * h * p * n * f
    fwd = (3 if shape.gate else 2) * tok * s + hd * s + bc * s + params + 2 * states
    bwd = (5 if shape.gate else 3) * tok * s + 2 * hd * s + bc * s + bc * f + 2 * params + 3 * states
    exps = hd * (shape.chunk + 1)
    return {"fwd_bytes": fwd, "fwdbwd_bytes": fwd + bwd, "fwd_exps": exps, "fwdbwd_exps": 3 * exps}


def floor_seconds(nbytes: float, exps: float, copy_bytes_per_s: float, exps_per_s: float) -> float:
    """``max(nbytes / copy_bytes_per_s, exps / exps_per_s)``: the time no kernel can beat."""
    if not (copy_bytes_per_s > 0 and exps_per_s > 0):
        raise ValueError(f"floor_seconds: rates must be > 0, got copy {copy_bytes_per_s}, exp {exps_per_s}")
    return max(nbytes / copy_bytes_per_s, exps / exps_per_s)


def check_targets(shape: GpuShape, row: dict) -> list[tuple[str, bool]]:
    """The issue's targets for one ``triton`` row (``fwd_floor_frac``, ``fwdbwd_s``, ``fwd_s`` and,
    if measured, ``x_chunked_fwd``/``x_chunked_fwdbwd``): forward >= 50% of the floor at N = 1 and
    >= 40% otherwise (the issue states N = 16; SSD's N = 128 gets the same 40%), forward+backward
    <= 4x forward, and >= 10x ``chunked`` (forward and forward+backward) when L >= 1024."""
    want = 0.5 if shape.d_state == 1 else 0.4
    out = [
        (f"fwd {row['fwd_floor_frac']:.0%} of floor >= {want:.0%}", row["fwd_floor_frac"] >= want),
        (f"f+b/fwd {row['fwdbwd_s'] / row['fwd_s']:.2f} <= 4", row["fwdbwd_s"] <= 4 * row["fwd_s"]),
    ]
    if shape.length >= 1024:
        for key, what in (("x_chunked_fwd", "fwd"), ("x_chunked_fwdbwd", "f+b")):
            if row.get(key) is not None:
                out.append((f"{what} {row[key]:.1f}x chunked >= 10x (L={shape.length})", row[key] >= 10))
    return out


def time_cuda(fn: Callable[[], object], *, repeat: int, warmup: int, flush_bytes: int) -> float:
    """Median seconds of ``repeat`` calls of ``fn`` timed by CUDA event pairs, after ``warmup``
    untimed calls; before each timed call ``flush_bytes`` bytes are written (L2 flush, outside the
    events). Needs CUDA."""
    check_positive_int("time_cuda", "repeat", repeat)
    if not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"time_cuda: warmup must be an int >= 0, got {warmup!r}")
    if not isinstance(flush_bytes, int) or flush_bytes < 0:
        raise ValueError(f"time_cuda: flush_bytes must be an int >= 0, got {flush_bytes!r}")
    flush = torch.empty(flush_bytes, dtype=torch.uint8, device="cuda") if flush_bytes else None
    for _ in range(warmup):
        fn()
    pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeat)]
    torch.cuda.synchronize()
    for start, end in pairs:
        if flush is not None:
            flush.fill_(1)
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in pairs) / 1e3


def copy_bandwidth(nbytes: int = 1 << 30, repeat: int = 20) -> float:
    """Bytes per second (read + written) of ``dst.copy_(src)`` for ``nbytes``-byte CUDA tensors."""
    src = torch.ones(nbytes // 4, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    t = time_cuda(lambda: dst.copy_(src), repeat=repeat, warmup=3, flush_bytes=0)
    return 2 * src.numel() * 4 / t


def _exp_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def exp_chain(x_ptr, out_ptr, n, REPS: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask, other=0.0)
        acc = tl.zeros_like(x)
        for _ in range(REPS):  # x stays in [-0.5, -0.35]: no overflow, no denormals
            x = tl.exp2(x) * -0.5
            acc += x
        tl.store(out_ptr + offs, acc, mask=mask)

    return exp_chain


def exp_chain(x: torch.Tensor, reps: int = _EXP_REPS) -> torch.Tensor:
    """``reps`` dependent ``x <- -exp2(x) / 2`` per element of float32 ``x [n]``, returning the sum
    of the iterates (Triton; CUDA, or CPU under ``TRITON_INTERPRET=1``)."""
    check_positive_int("exp_chain", "reps", reps)
    out = torch.empty_like(x)
    block = 1024
    _exp_kernel()[(math.ceil(x.numel() / block),)](x, out, x.numel(), REPS=reps, BLOCK=block)
    return out


def exp_rate(numel: int = 1 << 24, reps: int = _EXP_REPS, repeat: int = 20) -> tuple[float, float]:
    """Exponentials per second on the current GPU: ``(exp_chain kernel, torch.exp(x, out=y) on
    2**28 floats)``. The first is compute-bound (the floor uses it); the second is memory-bound."""
    x = -0.5 * torch.rand(numel, device="cuda")
    t = time_cuda(lambda: exp_chain(x, reps), repeat=repeat, warmup=3, flush_bytes=0)
    big = torch.rand(1 << 28, device="cuda")
    out = torch.empty_like(big)
    t_torch = time_cuda(lambda: torch.exp(big, out=out), repeat=repeat, warmup=3, flush_bytes=0)
    return numel * reps / t, big.numel() / t_torch


def _ssd_inputs(shape: GpuShape, dtype: torch.dtype, device: torch.device, requires_grad: bool) -> dict:
    g = torch.Generator().manual_seed(0)
    r = lambda *sz: torch.randn(*sz, generator=g)  # noqa: E731
    b, length, h, p = shape.batch, shape.length, shape.heads, shape.headdim
    io = dict(
        x=r(b, length, h, p), dt=r(b, length, h) - 1.0, B=r(b, length, shape.groups, shape.d_state),
        C=r(b, length, shape.groups, shape.d_state), z=r(b, length, h, p),
    )
    par = dict(A=-(1 + 15 * torch.rand(h, generator=g)), D=r(h), dt_bias=0.5 * r(h))
    out = {k: v.to(device=device, dtype=dtype) for k, v in io.items()}
    out.update({k: v.to(device) for k, v in par.items()})
    return {k: v.requires_grad_(requires_grad) for k, v in out.items()}


def _calls(shape: GpuShape, backend: str, dtype: torch.dtype, device: torch.device):
    """``(forward, forward+backward)`` closures over inputs built once (``dtype`` tokens, float32 state)."""
    if shape.kind == "ssd":
        fin, gin = (_ssd_inputs(shape, dtype, device, rg) for rg in (False, True))
        run = lambda kw: ssd_scan(**kw, chunk_size=shape.chunk, backend=backend)[0]  # noqa: E731
        cot_shape = (shape.batch, shape.length, shape.heads, shape.headdim)
    else:
        ins = make_scan_inputs(shape.batch, shape.length, shape.dim, shape.d_state, shape.groups, gate=shape.gate, device=device)
        fin = ins.cast(dtype, torch.float32, requires_grad=False).kwargs()
        gin = ins.cast(dtype, torch.float32, requires_grad=True).kwargs()
        run = lambda kw: selective_scan(**kw, backend=backend)[0]  # noqa: E731
        cot_shape = (shape.batch, shape.length, shape.dim)
    leaves = [t for t in gin.values() if t is not None]
    cot = torch.randn(*cot_shape, generator=torch.Generator().manual_seed(7)).to(device=device, dtype=dtype)

    def fwd():
        with torch.no_grad():
            return run(fin)

    def fwd_bwd():
        return torch.autograd.grad(run(gin), leaves, cot)

    return fwd, fwd_bwd


def run_gpu(
    shapes: list[GpuShape],
    backends: list[str],
    *,
    repeat: int = 20,
    warmup: int = 3,
    flush_bytes: int = 256 << 20,
    dtype: torch.dtype = torch.bfloat16,
    memory: bool = True,
    log: Callable[[str], None] = lambda s: None,
) -> dict:
    """Measure every (shape, backend) on the current CUDA device; returns the JSON-able report."""
    from .bench import _peak_bytes

    for b in backends:
        check_choice("run_gpu", "backends", b, GPU_BACKENDS)
    device = torch.device("cuda", torch.cuda.current_device())
    log("measuring copy bandwidth and exp rate ...")
    copy_bw = copy_bandwidth()
    exp_fast, exp_torch = exp_rate()
    rows = []
    for shape in shapes:
        model = traffic(shape, dtype)
        results: dict[str, dict] = {}
        for backend in backends:
            log(f"  {shape.name} / {backend} ...")
            row = {"shape": shape.name, "backend": backend, **asdict(shape), **model}
            try:
                fwd, fwd_bwd = _calls(shape, backend, dtype, device)
                row["fwd_s"] = time_cuda(fwd, repeat=repeat, warmup=warmup, flush_bytes=flush_bytes)
                row["fwdbwd_s"] = time_cuda(fwd_bwd, repeat=repeat, warmup=warmup, flush_bytes=flush_bytes)
                if memory:
                    row["peak_fwd_bytes"] = _peak_bytes(fwd, device)
                    row["peak_fwdbwd_bytes"] = _peak_bytes(fwd_bwd, device)
                del fwd, fwd_bwd
            except Exception as e:  # report and keep benchmarking the others
                rows.append({**row, "status": f"error: {type(e).__name__}: {e}".splitlines()[0]})
                torch.cuda.empty_cache()
                continue
            torch.cuda.empty_cache()
            row["status"] = "ok"
            row.update(derived(row, copy_bw, exp_fast))
            results[backend] = row
            rows.append(row)
        base = results.get("chunked")
        for backend, row in results.items():
            if base is not None and backend != "chunked":
                row["x_chunked_fwd"] = base["fwd_s"] / row["fwd_s"]
                row["x_chunked_fwdbwd"] = base["fwdbwd_s"] / row["fwdbwd_s"]
            if backend == "triton":
                row["targets"] = [[text, met] for text, met in check_targets(shape, row)]
    return {
        "device": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "dtype": str(dtype).replace("torch.", ""),
        "settings": {"repeat": repeat, "warmup": warmup, "flush_bytes": flush_bytes, "memory": memory},
        "copy_bytes_per_s": copy_bw,
        "exp_per_s": exp_fast,
        "torch_exp_per_s": exp_torch,
        "shapes": {s.name: asdict(s) for s in shapes},
        "rows": rows,
    }


def derived(row: dict, copy_bytes_per_s: float, exps_per_s: float) -> dict:
    """Achieved bytes/s and fraction of the floor, forward and forward+backward, from a row holding
    :func:`traffic`'s keys and ``fwd_s``/``fwdbwd_s``."""
    out = {}
    for k in ("fwd", "fwdbwd"):
        t = row[f"{k}_s"]
        fl = floor_seconds(row[f"{k}_bytes"], row[f"{k}_exps"], copy_bytes_per_s, exps_per_s)
        out[f"{k}_floor_s"] = fl
        out[f"{k}_floor_frac"] = fl / t
        out[f"{k}_bytes_per_s"] = row[f"{k}_bytes"] / t
    return out


def format_gpu_table(report: dict) -> str:
    """Human-readable table of a :func:`run_gpu` report, with the target checks below it."""
    head = (
        f"{'shape':<14}{'backend':<9}{'fwd ms':>9}{'f+b ms':>10}{'f+b/fwd':>9}{'GB/s':>9}{'% floor':>9}"
        f"{'x chunked':>11}{'peak MB':>10}"
    )
    lines = [f"{report['dtype']} inputs, float32 state; {report['device']}, torch {report['torch']}", head, "-" * len(head)]
    for r in report["rows"]:
        if r["status"] != "ok":
            lines.append(f"{r['shape']:<14}{r['backend']:<9}  {r['status']}")
            continue
        xc = r.get("x_chunked_fwd")
        peak = r.get("peak_fwdbwd_bytes")
        lines.append(
            f"{r['shape']:<14}{r['backend']:<9}{r['fwd_s'] * 1e3:>9.3f}{r['fwdbwd_s'] * 1e3:>10.3f}"
            f"{r['fwdbwd_s'] / r['fwd_s']:>9.2f}{r['fwd_bytes_per_s'] / 1e9:>9.0f}{100 * r['fwd_floor_frac']:>8.1f}%"
            f"{'-' if xc is None else format(xc, '.1f'):>11}{'-' if peak is None else format(peak / 2**20, '.0f'):>10}"
        )
    lines += [
        "",
        "GB/s and % floor are forward: model bytes / time and max(bytes / copy bandwidth, exps / exp rate) / time.",
        "x chunked: chunked forward time / this forward time.  peak MB: forward+backward, above the inputs.",
        f"copy bandwidth {report['copy_bytes_per_s'] / 1e9:.0f} GB/s; exp rate {report['exp_per_s'] / 1e12:.2f} Texp/s "
        f"(exp2 chain; torch.exp out= {report['torch_exp_per_s'] / 1e12:.2f}, memory-bound)",
        "targets (triton):",
    ]
    for r in report["rows"]:
        for text, met in r.get("targets", []):
            lines.append(f"  {r['shape']:<14}{text}: {'met' if met else 'MISSED'}")
    return "\n".join(lines)
