"""selective_scan backend="triton" against the float64 ``ref`` oracle: y, final state and every gradient.

Without a GPU the kernels run in the Triton interpreter on CPU tensors. ``TRITON_INTERPRET=1`` must be
set before triton is imported, so the interpreter cases run in one child process (this file executed
as a script); the child prints one JSON line of relative errors per case and the tests below assert
on it, showing the child's output when it fails. ``TestOnCuda`` runs the same comparisons in-process
at real sizes on a GPU.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F

from mz_kernels import selective_scan
from mz_kernels.testing import emit_interpreter_results, guarded, make_scan_inputs, rel_err, run_interpreted

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")
TOL = {torch.float32: 1e-5, torch.bfloat16: 5e-3, torch.float16: 5e-3}


@dataclass
class Case:
    id: str
    shape: tuple[int, int, int, int, int]  # (batch, L, D, N, G)
    dtype: torch.dtype = torch.float32
    opts: dict = field(default_factory=dict)  # make_scan_inputs options, plus softplus=False


F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
# Interpreter cases: L <= 64 (one checkpoint chunk) except the L=70 one, at most 8 programs each.
INTERP_CASES = [
    Case("f32-L37-N16-G1", (2, 37, 8, 16, 1)),
    Case("f32-L45-N1-G4-init", (2, 45, 8, 1, 4), opts=dict(initial_state=True)),
    Case("f32-L33-N1-G1-nogate", (1, 33, 16, 1, 1), opts=dict(gate=False)),
    Case("f32-L29-N16-G4-gather-init-nogate", (1, 29, 12, 16, 4), opts=dict(initial_state=True, gate=False)),
    Case("f32-L23-N16-G2-bare-nosoftplus", (2, 23, 6, 16, 2),
         opts=dict(skip=False, gate=False, bias=False, softplus=False)),
    Case("f32-L70-N16-G2-2chunks-init", (1, 70, 4, 16, 2), opts=dict(initial_state=True)),
    Case("f32-L1-N16-G1", (2, 1, 4, 16, 1)),
    Case("f32-L48-N16-decay50-init", (2, 48, 8, 16, 1), opts=dict(max_decay=50.0, initial_state=True)),
    Case("bf16-L37-N16-G1", (2, 37, 8, 16, 1), BF16),
    Case("bf16-L45-N1-G4-init", (2, 45, 8, 1, 4), BF16, dict(initial_state=True)),
    Case("f16-L31-N16-G4-gather", (1, 31, 12, 16, 4), F16),
]
GPU_CASES = [
    Case("f32-B2-L2048-D768-N16", (2, 2048, 768, 16, 1)),
    Case("bf16-B2-L2048-D768-N16", (2, 2048, 768, 16, 1), BF16),
    Case("bf16-vmamba-B8-L3136-D384-N1-G4-nogate", (8, 3136, 384, 1, 4), BF16, dict(gate=False)),
    Case("f32-L1000-D96-N16-G4-init", (2, 1000, 96, 16, 4), opts=dict(initial_state=True)),
    Case("f32-L515-D768-N16-G256-gather", (8, 515, 768, 16, 256)),  # D/G = 3: per-channel B/C gather
    Case("f32-L300-D64-N64-nosoftplus", (2, 300, 64, 64, 1), opts=dict(softplus=False)),
]


def _run(ins, softplus: bool, backend: str, cot):
    y, h = selective_scan(**ins.kwargs(), delta_softplus=softplus, output_final_state=True, backend=backend)
    leaves = [t for t in ins.tensors() if t is not None]
    grads = iter(torch.autograd.grad((y, h), leaves, (cot[0].to(y.dtype), cot[1].to(h.dtype))))
    return y, h, [None if t is None else next(grads) for t in ins.tensors()]


def compare(case: Case, device: str) -> dict[str, float]:
    """Relative errors of backend="triton" vs float64 ``ref`` on the same (rounded) values."""
    opts = dict(case.opts)
    softplus = opts.pop("softplus", True)
    base = make_scan_inputs(*case.shape, seed=sum(case.shape), device=device, **opts)
    if not softplus:  # without softplus the step sizes must already be positive
        base.delta = F.softplus(base.delta)
    Bsz, L, Dm, N, _ = case.shape
    gen = torch.Generator().manual_seed(1)
    cot = (  # the y cotangent is rounded to the input dtype so both paths see the same values
        torch.randn(Bsz, L, Dm, generator=gen).to(case.dtype).to(device, torch.float64),
        torch.randn(Bsz, Dm, N, generator=gen).to(device, torch.float64),
    )
    y0, h0, g0 = _run(base.cast(case.dtype).cast(torch.float64), softplus, "ref", cot)
    ins = base.cast(case.dtype)
    y1, h1, g1 = _run(ins, softplus, "triton", cot)
    assert y1.dtype == case.dtype and h1.dtype == torch.float32, (y1.dtype, h1.dtype)
    errors = {"y": rel_err(y1, y0), "final_state": rel_err(h1, h0)}
    for name, x, a, b in zip(NAMES, ins.tensors(), g1, g0):
        if x is None:
            assert a is None, f"d{name} should be None"
            continue
        assert a.dtype == x.dtype and a.shape == x.shape, (name, a.dtype, x.dtype, a.shape, x.shape)
        errors[f"d{name}"] = rel_err(a, b) if torch.isfinite(a).all() else float("inf")
    return errors


def _extra_checks() -> dict:
    """Interpreter-side checks beyond the oracle comparison (values asserted by the parent)."""
    from mz_kernels.selective_scan import triton as tb

    out: dict = {}
    ins = make_scan_inputs(2, 40, 8, 16, 2, initial_state=True, seed=11).cast(F32, requires_grad=False)
    y_plain, h_plain = selective_scan(**ins.kwargs(), output_final_state=True, backend="triton")
    ins.u.requires_grad_(True)  # the grad path also writes the checkpoints (SAVE=True)
    y_grad, h_grad = selective_scan(**ins.kwargs(), output_final_state=True, backend="triton")
    out["nograd_vs_grad_forward"] = max(rel_err(y_plain, y_grad.detach()), rel_err(h_plain, h_grad.detach()))

    f64 = make_scan_inputs(1, 9, 4, 3, 1, seed=12).cast(torch.float64)
    cot = (torch.randn(1, 9, 4, dtype=torch.float64), torch.randn(1, 4, 3, dtype=torch.float64))
    y0, h0, g0 = _run(f64, True, "ref", cot)
    y1, h1, g1 = _run(f64, True, "triton", cot)
    out["float64_delegates_to_ref"] = max(rel_err(a, b) for a, b in zip([y1, h1, *g1], [y0, h0, *g0]) if a is not None)

    big = make_scan_inputs(1, 2, 2, 257, 1, seed=13).cast(F32, requires_grad=False)
    try:
        selective_scan(**big.kwargs(), backend="triton")
        out["n_too_large_message"] = None
    except ValueError as e:
        out["n_too_large_message"] = str(e)

    saved_limit = tb.INT64_OFFSETS_FROM
    tb.INT64_OFFSETS_FROM = 0  # the int64-offset variant of both kernels (normally rows >= 2**31)
    try:
        errs = compare(Case("i64", (1, 21, 12, 16, 4), opts=dict(initial_state=True)), "cpu")
    finally:
        tb.INT64_OFFSETS_FROM = saved_limit
    out["int64_offsets_max_error"] = max(errs.values())

    violations = []
    for Dm, G, N, sm in [(8, 4, 16, None), (12, 4, 16, None), (96, 32, 16, 132), (384, 4, 1, 132), (768, 1, 16, 132),
                         (1536, 8, 64, 132), (6, 2, 16, None), (256, 256, 4, 132), (1, 1, 1, None), (100, 5, 256, 132)]:
        cfg = tb.pick_config(2, Dm, N, G, sm)
        if cfg.one_group and G > 1 and (Dm // G) % cfg.block_d:
            violations.append(f"D={Dm} G={G} N={N}: block_d={cfg.block_d} crosses a group")
        if cfg.block_n < N or cfg.block_d * cfg.block_n > 256 and cfg.block_d > 1:
            violations.append(f"D={Dm} G={G} N={N}: tile {cfg.block_d}x{cfg.block_n}")
    out["config_violations"] = violations
    out["one_group_by_case"] = {
        c.id: tb.pick_config(c.shape[0], c.shape[2], c.shape[3], c.shape[4]).one_group for c in INTERP_CASES
    }
    return out


def _child_main() -> None:
    results = {case.id: guarded(lambda case=case: {"errors": compare(case, "cpu")}) for case in INTERP_CASES}
    results["_extra"] = guarded(_extra_checks)
    emit_interpreter_results(results)


@pytest.fixture(scope="module")
def interpreted():
    """Run every interpreter case in one child process; returns (results, child stderr)."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    try:
        return run_interpreted(__file__)
    except RuntimeError as e:
        pytest.fail(str(e))


def _check(case: Case, res: dict, log: str = "") -> None:
    if "crash" in res:
        pytest.fail(f"{case.id} raised in the child:\n{res['crash']}\n{log[-2000:]}")
    tol = TOL[case.dtype]
    bad = {k: f"{v:.2e}" for k, v in res["errors"].items() if not v <= tol}
    assert not bad, f"{case.id}: relative error above {tol:.0e} in {bad}"


@pytest.mark.parametrize("case", INTERP_CASES, ids=[c.id for c in INTERP_CASES])
def test_interpreter_matches_ref(interpreted, case):
    results, log = interpreted
    _check(case, results[case.id], log)


def test_interpreter_extra_checks(interpreted):
    results, log = interpreted
    extra = results["_extra"]
    assert "crash" not in extra, extra.get("crash", "") + log[-2000:]
    assert extra["nograd_vs_grad_forward"] == 0.0  # SAVE only adds stores: the same arithmetic
    assert extra["float64_delegates_to_ref"] == 0.0
    assert extra["n_too_large_message"] is not None and "257" in extra["n_too_large_message"]
    assert extra["int64_offsets_max_error"] <= TOL[F32]
    assert extra["config_violations"] == []
    # the cases exercise both ways of reading groups (one group per channel block, per-channel gather)
    assert set(extra["one_group_by_case"].values()) == {True, False}, extra["one_group_by_case"]


def test_import_mz_kernels_does_not_import_the_triton_backend():
    code = (
        "import sys, torch, mz_kernels\n"
        "from mz_kernels.testing import make_scan_inputs\n"
        "ins = make_scan_inputs(1, 5, 4, 2, seed=0).cast(torch.float32, requires_grad=False)\n"
        "mz_kernels.selective_scan(**ins.kwargs(), backend='ref'); mz_kernels.backend_status()\n"
        "print(sorted(m for m in sys.modules if m.startswith('mz_kernels.selective_scan.triton')))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MZ_SCAN_BACKEND")}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.gpu
class TestOnCuda:
    """The same comparisons compiled for the GPU at model sizes (skipped without CUDA)."""

    @pytest.mark.parametrize("case", GPU_CASES, ids=[c.id for c in GPU_CASES])
    def test_matches_ref(self, case):
        _check(case, {"errors": compare(case, "cuda")})


if __name__ == "__main__":
    _child_main()
