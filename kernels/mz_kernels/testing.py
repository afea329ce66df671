"""Helpers for tests and benchmarks of the scan kernels: input factories and error measures."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

_INTERPRETER_TAG = "MZ_INTERPRETER_RESULTS "


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64 (0 when both are zero)."""
    o, r = out.double(), ref.double()
    den = r.norm().item()
    num = (o - r).norm().item()
    return num / den if den > 0 else num


def assert_close(name: str, out: torch.Tensor | None, ref: torch.Tensor | None, tol: float) -> None:
    """Fail with a readable message unless ``out`` matches ``ref`` within relative error ``tol`` and is finite."""
    if out is None or ref is None:
        assert out is None and ref is None, f"{name}: one of out/ref is None"
        return
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    err = rel_err(out, ref)
    assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.1e}"


@dataclass
class ScanInputs:
    """Inputs of :func:`mz_kernels.selective_scan` (None for absent optional ones)."""

    u: torch.Tensor
    delta: torch.Tensor
    A: torch.Tensor
    B: torch.Tensor
    C: torch.Tensor
    D: torch.Tensor | None
    z: torch.Tensor | None
    delta_bias: torch.Tensor | None
    initial_state: torch.Tensor | None

    def tensors(self) -> list[torch.Tensor | None]:
        return [self.u, self.delta, self.A, self.B, self.C, self.D, self.z, self.delta_bias, self.initial_state]

    def kwargs(self) -> dict:
        return dict(zip(("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state"), self.tensors()))

    def cast(self, dtype: torch.dtype, state_dtype: torch.dtype | None = None, requires_grad: bool = True) -> "ScanInputs":
        """Copy with u/delta/z/B/C in ``dtype`` and A/D/delta_bias/initial_state in ``state_dtype``."""
        sd = state_dtype or (torch.float64 if dtype == torch.float64 else torch.float32)
        out = []
        for name, t in zip(("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state"), self.tensors()):
            if t is None:
                out.append(None)
                continue
            want = sd if name in ("A", "D", "delta_bias", "initial_state") else dtype
            out.append(t.detach().to(want).contiguous().requires_grad_(requires_grad))
        return ScanInputs(*out)


def make_scan_inputs(
    batch: int,
    length: int,
    dim: int,
    d_state: int,
    groups: int = 1,
    *,
    skip: bool = True,
    gate: bool = True,
    bias: bool = True,
    initial_state: bool = False,
    max_decay: float | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> ScanInputs:
    """Random float32 inputs with Mamba-like statistics (A = -(1..N) style, signed B*u).

    ``max_decay``: if given, delta and A are scaled so ``dt * |A|`` reaches about that value per step
    (stress test for exp underflow and overflow).
    """
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    A = -(torch.arange(1, d_state + 1, dtype=torch.float32).repeat(dim, 1) * (0.5 + torch.rand(dim, 1, generator=g)))
    delta = r(batch, length, dim) - 1.0
    if max_decay is not None:
        A = A / A.abs().max() * max_decay  # |A| <= max_decay
        delta = r(batch, length, dim).abs() * 3 + 2  # softplus(delta) ~ delta up to ~1
    ins = ScanInputs(
        u=r(batch, length, dim),
        delta=delta,
        A=A,
        B=r(batch, length, groups, d_state),
        C=r(batch, length, groups, d_state),
        D=r(dim) if skip else None,
        z=r(batch, length, dim) if gate else None,
        delta_bias=r(dim) * 0.5 if bias else None,
        initial_state=r(batch, dim, d_state) if initial_state else None,
    )
    out = ScanInputs(*[None if t is None else t.to(device) for t in ins.tensors()])
    return out


# ---- running Triton kernels in the interpreter -------------------------------------------------
# TRITON_INTERPRET must be set before triton is imported, so a test module runs its interpreter
# cases as a child process of itself: the child collects every case (a crash in one does not hide
# the others) and prints one tagged JSON line, which the parent parses and asserts on per case.


def guarded(fn: Callable[[], Any]) -> Any:
    """``fn()``, or ``{"crash": <traceback>}`` if it raises."""
    try:
        return fn()
    except Exception:
        return {"crash": traceback.format_exc()}


def emit_interpreter_results(results: dict) -> None:
    """Child side: print ``results`` as the tagged JSON line :func:`run_interpreted` reads."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("run with TRITON_INTERPRET=1")
    print(_INTERPRETER_TAG + json.dumps(results), flush=True)


def run_interpreted(script: str, *, timeout: float = 900) -> tuple[dict, str]:
    """Parent side: run ``script`` with ``TRITON_INTERPRET=1`` (and no ``MZ_SCAN_BACKEND``).

    Returns:
        ``(results, child stderr)``.

    Raises:
        RuntimeError: the child failed or printed no result; the message holds its output tails.
    """
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    env.pop("MZ_SCAN_BACKEND", None)
    proc = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(_INTERPRETER_TAG)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(
            f"interpreter child exited with {proc.returncode}\n"
            f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-8000:]}"
        )
    return json.loads(lines[-1][len(_INTERPRETER_TAG):]), proc.stderr
