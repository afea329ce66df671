"""ssd_scan and causal_conv1d with backend="triton" against the float64 ``ref`` oracle: outputs, final
state and every gradient (random cotangents on both).

Without a GPU the kernels run in the Triton interpreter on CPU tensors. ``TRITON_INTERPRET=1`` must be
set before triton is imported, so the interpreter cases run in one child process (this file executed
as a script); the child prints one JSON line of relative errors per case and the tests below assert
on it, showing the child's output when it fails. ``test_kernels_compile_for_sm90`` compiles every
kernel for an H100 ahead of time (no GPU needed) and checks shared memory and register spills;
``TestOnCuda`` runs the comparisons in-process at model sizes on a GPU.
"""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

import pytest
import torch

from mz_kernels.conv1d import causal_conv1d
from mz_kernels.ssd import ssd_scan
from mz_kernels.testing import emit_interpreter_results, guarded, rel_err, run_interpreted

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
TOL = {F32: 1e-5, BF16: 5e-3, F16: 1e-3}
SSD_PARAMS = ("A", "D", "dt_bias", "initial_state")  # float32 whatever the activation dtype


@dataclass
class SSDCase:
    id: str
    shape: tuple[int, int, int, int, int, int]  # (batch, L, H, P, G, N)
    chunk: int
    dtype: torch.dtype = F32
    opts: dict = field(default_factory=dict)  # d ("HP" | "H" | None), z, init, seqs, softplus, decay


@dataclass
class ConvCase:
    id: str
    shape: tuple[int, int, int, int]  # (batch, L, D, W)
    dtype: torch.dtype = F32
    bias: bool = True
    activation: str | None = "silu"
    init: bool = True


# Interpreter cases: L <= 64 except one conv case, at most ~24 programs per kernel launch.
SSD_CASES = [
    SSDCase("f32-L37-chunk16-N16-G2-Dhp-z-init", (1, 37, 4, 3, 2, 16), 16),
    SSDCase("bf16-L37-chunk16-N16-G2-Dhp-z-init", (1, 37, 4, 3, 2, 16), 16, BF16),
    SSDCase("f32-L23-chunk16-N1-G1-Dh-noz-noinit", (2, 23, 2, 4, 1, 1), 16, opts=dict(d="H", z=False, init=False)),
    SSDCase("bf16-L23-chunk16-N1-G1-Dh-noz-noinit", (2, 23, 2, 4, 1, 1), 16, BF16, dict(d="H", z=False, init=False)),
    SSDCase("f32-L45-chunk16-seq_idx-3-packed", (1, 45, 2, 3, 1, 5), 16, opts=dict(seqs=(11, 20, 14))),
    SSDCase("bf16-L45-chunk16-seq_idx-3-packed", (1, 45, 2, 3, 1, 5), 16, BF16, dict(seqs=(11, 20, 14))),
    SSDCase("f32-L50-chunk16-seq_idx-edge-G2-nosoftplus", (1, 50, 2, 5, 2, 16), 16,
            opts=dict(seqs=(16, 3, 31), softplus=False)),
    SSDCase("f32-L41-chunk32-P33-N33-tiles-noD-noinit", (1, 41, 2, 33, 1, 33), 32, opts=dict(d=None, init=False)),
    SSDCase("bf16-L30-chunk16-P33-N40-tiles", (1, 30, 2, 33, 1, 40), 16, BF16),
    SSDCase("f32-L1-N16", (2, 1, 2, 2, 1, 16), 16),
    SSDCase("f32-L40-chunk64-decay30-nosoftplus", (1, 40, 2, 3, 1, 16), 64, opts=dict(softplus=False, decay=30.0)),
    SSDCase("f16-L29-chunk64-N16-G2", (1, 29, 2, 16, 2, 16), 64, F16),
]
CONV_CASES = [
    ConvCase("f32-W4-bias-silu-init-L37", (2, 37, 5, 4)),
    ConvCase("bf16-W4-bias-silu-init-L37", (2, 37, 5, 4), BF16),
    ConvCase("f32-W2-linear-noinit-L300-D130-tiles", (1, 300, 130, 2), bias=False, activation=None, init=False),
    ConvCase("bf16-W2-bias-linear-init-L50", (1, 50, 33, 2), BF16, activation=None),
    ConvCase("f32-W4-L3-shorter-than-state", (2, 3, 3, 4)),
    ConvCase("f32-W1-bias-silu", (1, 9, 4, 1), init=False),
]
GPU_SSD_CASES = [
    SSDCase("f32-B2-L1000-H8-P64-N128", (2, 1000, 8, 64, 1, 128), 64),
    SSDCase("bf16-B2-L1000-H8-P64-N128", (2, 1000, 8, 64, 1, 128), 64, BF16),
    SSDCase("bf16-B1-L777-H6-P48-G2-N64-seq_idx", (1, 777, 6, 48, 2, 64), 64, BF16, dict(seqs=(300, 77, 400))),
    SSDCase("f16-B2-L515-H4-P64-N16", (2, 515, 4, 64, 1, 16), 32, F16),
]
GPU_CONV_CASES = [
    ConvCase("bf16-B4-L2048-D1536-W4", (4, 2048, 1536, 4), BF16),
    ConvCase("f32-B2-L1001-D768-W2-linear", (2, 1001, 768, 2), activation=None, init=False),
]


def ssd_inputs(case: SSDCase, device: str) -> tuple[dict, torch.Tensor | None, tuple]:
    """float64 inputs (already rounded to the case's dtypes), seq_idx and the cotangents."""
    b, L, h, p, g, n = case.shape
    o = case.opts
    gen = torch.Generator().manual_seed(sum(case.shape))
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    u = lambda *s: torch.rand(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    softplus = o.get("softplus", True)
    d = o.get("d", "HP")
    ins = {
        "x": r(b, L, h, p),
        "dt": r(b, L, h) - 1.0 if softplus else 0.2 + 0.8 * u(b, L, h),
        "A": -(0.5 + u(h)) * o.get("decay", 1.0),
        "B": r(b, L, g, n),
        "C": r(b, L, g, n),
        "D": None if d is None else r(h, p) if d == "HP" else r(h),
        "z": r(b, L, h, p) if o.get("z", True) else None,
        "dt_bias": 0.5 * r(h) if softplus else None,
        "initial_state": r(b, h, p, n) if o.get("init", True) else None,
    }
    ins = {k: None if v is None else v.to(F32 if k in SSD_PARAMS else case.dtype).double().to(device)
           for k, v in ins.items()}
    seq_idx = None
    if "seqs" in o:
        ids = torch.repeat_interleave(torch.arange(len(o["seqs"])), torch.tensor(o["seqs"]))
        seq_idx = ids[None].expand(b, -1).contiguous().to(device)
    cot = (r(b, L, h, p).to(case.dtype).double().to(device), r(b, h, p, n).float().double().to(device))
    return ins, seq_idx, cot


def run_ssd(case: SSDCase, ins: dict, seq_idx, cot, dtype: torch.dtype, backend: str) -> dict:
    leaves = {k: v.detach().to(F32 if (k in SSD_PARAMS and dtype != torch.float64) else dtype).requires_grad_(True)
              for k, v in ins.items() if v is not None}
    a = {k: leaves.get(k) for k in ins}
    y, final = ssd_scan(
        a["x"], a["dt"], a["A"], a["B"], a["C"], chunk_size=case.chunk, D=a["D"], z=a["z"], dt_bias=a["dt_bias"],
        dt_softplus=case.opts.get("softplus", True), initial_state=a["initial_state"], seq_idx=seq_idx,
        output_final_state=True, backend=backend,
    )
    return _with_grads(y, final, leaves, cot)


def _with_grads(y: torch.Tensor, final: torch.Tensor, leaves: dict, cot: tuple | None) -> dict:
    """Outputs and the gradients of every leaf for cotangents ``cot`` (``None``: of ``y.sum() + final.sum()``)."""
    if cot is None:
        grads = torch.autograd.grad(y.sum() + final.sum(), list(leaves.values()))
    else:
        grads = torch.autograd.grad((y, final), list(leaves.values()), (cot[0].to(y.dtype), cot[1].to(final.dtype)))
    return {"y": y, "final_state": final, **{f"d{k}": gk for k, gk in zip(leaves, grads)}, "_leaves": leaves}


def _errors(got: dict, want: dict) -> dict[str, float]:
    out = {}
    for k, ref_val in want.items():
        if k.startswith("_"):
            continue
        v = got[k]
        assert v.shape == ref_val.shape, (k, tuple(v.shape), tuple(ref_val.shape))
        out[k] = rel_err(v, ref_val) if torch.isfinite(v).all() else float("inf")
    return out


def compare_ssd(case: SSDCase, device: str) -> dict[str, float]:
    """Relative errors of backend="triton" vs float64 ``ref`` on the same (rounded) values."""
    ins, seq_idx, cot = ssd_inputs(case, device)
    want = run_ssd(case, ins, seq_idx, cot, torch.float64, "ref")
    got = run_ssd(case, ins, seq_idx, cot, case.dtype, "triton")
    assert got["y"].dtype == case.dtype and got["final_state"].dtype == F32
    for k, leaf in got["_leaves"].items():
        assert got[f"d{k}"].dtype == leaf.dtype, (k, got[f"d{k}"].dtype, leaf.dtype)
    return _errors(got, want)


def run_conv(case: ConvCase, ins: dict, cot, dtype: torch.dtype, backend: str) -> dict:
    leaves = {k: v.detach().to(dtype if k == "x" or dtype == torch.float64 else F32).requires_grad_(True)
              for k, v in ins.items() if v is not None}
    y, final = causal_conv1d(leaves["x"], leaves["weight"], leaves.get("bias"), case.activation,
                             leaves.get("initial_state"), output_final_state=True, backend=backend)
    return _with_grads(y, final, leaves, cot)


def compare_conv(case: ConvCase, device: str) -> dict[str, float]:
    b, L, d, w = case.shape
    gen = torch.Generator().manual_seed(sum(case.shape))
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    ins = {
        "x": r(b, L, d).to(case.dtype).double().to(device),
        "weight": r(d, w).float().double().to(device),
        "bias": r(d).float().double().to(device) if case.bias else None,
        "initial_state": r(b, d, w - 1).float().double().to(device) if case.init else None,
    }
    cot = (r(b, L, d).to(case.dtype).double().to(device), r(b, d, w - 1).float().double().to(device))
    want = run_conv(case, ins, cot, torch.float64, "ref")
    got = run_conv(case, ins, cot, case.dtype, "triton")
    assert got["y"].dtype == case.dtype and got["final_state"].dtype == F32
    return _errors(got, want)


def _sum_loss_error(case: SSDCase | ConvCase) -> float:
    """Max relative gradient error for ``loss = y.sum() + final.sum()``, whose cotangents reach the
    backward as expanded (stride-0) views."""
    paths = ((torch.float64, "ref"), (case.dtype, "triton"))
    if isinstance(case, SSDCase):
        ins, seq_idx, _ = ssd_inputs(case, "cpu")
        runs = [run_ssd(case, ins, seq_idx, None, dt, be) for dt, be in paths]
    else:
        b, L, d, w = case.shape
        f64 = dict(dtype=torch.float64, generator=torch.Generator().manual_seed(7))
        ins = dict(x=torch.randn(b, L, d, **f64), weight=torch.randn(d, w, **f64), bias=None,
                   initial_state=torch.randn(b, d, w - 1, **f64))
        runs = [run_conv(case, ins, None, dt, be) for dt, be in paths]
    return max(v for k, v in _errors(runs[1], runs[0]).items() if k.startswith("d"))


def _extra_checks() -> dict:
    """Interpreter-side checks beyond the oracle comparisons (asserted by the parent)."""
    from mz_kernels.ssd import triton as ssd_triton

    out: dict = {}
    case = SSD_CASES[0]  # H = 4, G = 2: two heads per group, so two splits of one head
    ins, seq_idx, cot = ssd_inputs(case, "cpu")
    want = run_ssd(case, ins, seq_idx, cot, torch.float64, "ref")
    f32 = {k: None if v is None else v.float() for k, v in ins.items()}
    grads = ssd_triton.ssd_triton_bwd(cot[0].float(), cot[1].float(), *(f32[k] for k in ("x", "dt", "A", "B", "C")),
                                      chunk_size=case.chunk, D=f32["D"], z=f32["z"], dt_bias=f32["dt_bias"],
                                      initial_state=f32["initial_state"], head_splits=2)
    out["head_splits_2_max_error"] = max(rel_err(grads[k], want[f"d{k}"]) for k in ("B", "C", "x", "dt"))

    f64, seq64, cot64 = ssd_inputs(SSD_CASES[4], "cpu")
    runs = [run_ssd(SSD_CASES[4], f64, seq64, cot64, torch.float64, be) for be in ("triton", "chunked")]
    out["ssd_float64_delegates_to_chunked"] = max(rel_err(runs[0][k], runs[1][k]) for k in runs[1] if k[0] != "_")
    conv, gen = CONV_CASES[0], torch.Generator().manual_seed(6)
    x = torch.randn(conv.shape[:3], dtype=torch.float64, generator=gen)
    w = torch.randn(conv.shape[2], conv.shape[3], dtype=torch.float64, generator=gen)
    pair = [causal_conv1d(x, w, None, "silu", backend=be)[0] for be in ("triton", "ref")]
    out["conv_float64_delegates_to_ref"] = rel_err(pair[0], pair[1])

    out["sum_loss_max_error"] = max(_sum_loss_error(SSD_CASES[4]), _sum_loss_error(CONV_CASES[0]))

    gen.manual_seed(5)
    rq = lambda *s: torch.randn(*s, generator=gen).requires_grad_(True)  # noqa: E731
    b, L, h, p, g, n = 1, 20, 2, 3, 1, 4
    ssd_args = (rq(b, L, h, p), rq(b, L, h), (-torch.rand(h, generator=gen)).requires_grad_(True), rq(b, L, g, n),
                rq(b, L, g, n), rq(h), rq(b, L, h, p), rq(h), rq(b, h, p, n), None, 16, True, "triton")
    conv_args = (rq(2, 9, 5), rq(5, 4), rq(5), rq(2, 5, 3), "silu", "triton")
    out["opcheck"] = {
        "ssd": torch.library.opcheck(torch.ops.mz.ssd_scan_fwd.default, ssd_args),
        "conv": torch.library.opcheck(torch.ops.mz.causal_conv1d_fwd.default, conv_args),
    }

    cfgs = {
        "bf16-mamba2": ssd_triton.pick_config(8, 2048, 24, 1, 64, 128, 256, True, 132),
        "f32-small": ssd_triton.pick_config(1, 37, 4, 2, 3, 1, 16, False, None),
    }
    out["configs"] = {k: c.__dict__ for k, c in cfgs.items()}
    return out


def _child_main() -> None:
    import mz_kernels  # noqa: F401

    prefixes = ("mz_kernels.ssd.triton", "mz_kernels.conv1d.triton")
    loaded = sorted(m for m in sys.modules if m == "triton" or m.startswith(prefixes))
    results: dict = {"_import": loaded}
    for case in SSD_CASES:
        results[case.id] = guarded(lambda case=case: {"errors": compare_ssd(case, "cpu")})
    for case in CONV_CASES:
        results[case.id] = guarded(lambda case=case: {"errors": compare_conv(case, "cpu")})
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


def _check(case: SSDCase | ConvCase, res: dict, log: str = "") -> None:
    if "crash" in res:
        pytest.fail(f"{case.id} raised in the child:\n{res['crash']}\n{log[-2000:]}")
    tol = TOL[case.dtype]
    bad = {k: f"{v:.2e}" for k, v in res["errors"].items() if not v <= tol}
    assert not bad, f"{case.id}: relative error above {tol:.0e} in {bad} (all: {res['errors']})"


@pytest.mark.parametrize("case", SSD_CASES, ids=[c.id for c in SSD_CASES])
def test_ssd_interpreter_matches_ref(interpreted, case):
    results, log = interpreted
    _check(case, results[case.id], log)


@pytest.mark.parametrize("case", CONV_CASES, ids=[c.id for c in CONV_CASES])
def test_conv_interpreter_matches_ref(interpreted, case):
    results, log = interpreted
    _check(case, results[case.id], log)


def test_interpreter_extra_checks(interpreted):
    results, log = interpreted
    extra = results["_extra"]
    assert "crash" not in extra, extra.get("crash", "") + log[-2000:]
    assert extra["head_splits_2_max_error"] <= TOL[F32]
    assert extra["ssd_float64_delegates_to_chunked"] == 0.0
    assert extra["conv_float64_delegates_to_ref"] == 0.0
    assert extra["sum_loss_max_error"] <= TOL[F32]
    for op, checks in extra["opcheck"].items():  # schema, fake tensor, autograd, aot dispatch
        assert set(checks.values()) == {"SUCCESS"}, (op, checks)
    big, small = extra["configs"]["bf16-mamba2"], extra["configs"]["f32-small"]
    assert (big["chunk"], big["block_p"], big["block_n"], big["block_p_bwd"]) == (64, 64, 64, 32)
    assert big["head_splits"] == 1  # 8 * 32 chunks already give two programs per SM
    assert (small["chunk"], small["block_p"], small["block_n"], small["head_splits"]) == (16, 16, 16, 1)


def test_import_mz_kernels_does_not_import_triton(interpreted):
    results, _ = interpreted
    assert results["_import"] == [], results["_import"]


def test_backend_arguments_are_validated(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("MZ_SCAN_BACKEND", raising=False)
    torch.manual_seed(0)
    x, w = torch.randn(1, 5, 3), torch.randn(3, 2)
    expected = r"causal_conv1d: backend must be one of \['auto', 'ref', 'cpu', 'triton'\], got 'fast'"
    with pytest.raises(ValueError, match=expected):
        causal_conv1d(x, w, backend="fast")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"backend 'triton' needs CUDA tensors"):
            causal_conv1d(x, w, backend="triton")
        xs = torch.randn(1, 5, 2, 3)
        with pytest.raises(ValueError, match=r"ssd_scan: backend 'triton' needs CUDA tensors"):
            ssd_scan(xs, torch.randn(1, 5, 2), -torch.rand(2), torch.randn(1, 5, 1, 4), torch.randn(1, 5, 1, 4),
                     backend="triton")
    # auto keeps CPU tensors off Triton (the C kernel, or the reference without a compiler)
    y_auto, _ = causal_conv1d(x, w, activation="silu")
    y_ref, _ = causal_conv1d(x, w, activation="silu", backend="ref")
    torch.testing.assert_close(y_auto, y_ref, rtol=1e-6, atol=1e-6)


# --- ahead-of-time compilation for an H100 (sm_90), no GPU needed ---------------------------------

def _sm90_builds(dtype: str):
    """(name, kernel, pointer dtypes, constexprs, num_warps) at the Mamba-2 configuration
    (H = 24, P = 64, N = 128, chunk 64) for ``dtype`` inputs ("bf16" or "fp32")."""
    import triton.language as tl

    from mz_kernels.conv1d import triton as ct
    from mz_kernels.ssd import triton as st
    from mz_kernels.ssd import triton_kernels as sk

    tensor_cores = dtype == "bf16"
    cfg = st.pick_config(8, 2048, 24, 1, 64, 128, 64, tensor_cores, 132)
    x = "*" + dtype
    mm = dict(Q=cfg.chunk, DOT=tl.bfloat16 if tensor_cores else tl.float32, MM=1 if tensor_cores else 0)
    fwd = dict(mm, BP=cfg.block_p, BN=cfg.block_n)
    bwd = dict(mm, BP=cfg.block_p_bwd, BN=cfg.block_n_bwd)
    seq = {"seg_ptr": "*i32"}
    return [
        ("cumsum", sk.ssd_cumsum_kernel, {"dt_ptr": x}, dict(HAS_BIAS=True, SOFTPLUS=True, Q=cfg.chunk, BH=16),
         cfg.warps_small),
        ("bmm", sk.ssd_bmm_kernel, {"C_ptr": x, "B_ptr": x}, dict(mm, BN=cfg.block_n), cfg.warps),
        ("chunk_state", sk.ssd_chunk_state_kernel, {"X_ptr": x, "Y_ptr": x, **seq},
         dict(fwd, ADJOINT=False, HAS_SEQ=True), cfg.warps),
        ("state_passing", sk.ssd_state_passing_kernel, seq,
         dict(HAS_INIT=True, HAS_SEQ=True, REVERSE=True, Q=cfg.chunk, BLOCK=256), cfg.warps_small),
        ("chunk_scan", sk.ssd_chunk_scan_kernel, {"x_ptr": x, "z_ptr": x, "C_ptr": x, "out_ptr": x, **seq},
         dict(fwd, HAS_D=True, D_VEC=False, HAS_Z=True, GATE_BWD=False, HAS_SEQ=True, EMU=False), cfg.warps),
        ("chunk_scan_gate_bwd", sk.ssd_chunk_scan_kernel, {"x_ptr": x, "z_ptr": x, "C_ptr": x, "dy_ptr": x,
                                                           "dz_ptr": x},
         dict(fwd, HAS_D=True, D_VEC=True, HAS_Z=True, GATE_BWD=True, HAS_SEQ=False, EMU=False), cfg.warps),
        ("bwd_dx", sk.ssd_bwd_dx_kernel, {"x_ptr": x, "dt_ptr": x, "B_ptr": x, "C_ptr": x, "dx_ptr": x, **seq},
         dict(bwd, HAS_D=True, D_VEC=False, HAS_BIAS=True, SOFTPLUS=True, DY_F32=True, HAS_SEQ=True, EMU=False),
         cfg.warps),
        ("bwd_dbc", sk.ssd_bwd_dbc_kernel, {"x_ptr": x, "B_ptr": x, "C_ptr": x, **seq},
         dict(bwd, DY_F32=True, HAS_SEQ=True), cfg.warps),
        ("conv_fwd", ct.conv1d_fwd_kernel, {"x_ptr": x, "y_ptr": x, "dy_ptr": x},
         dict(W=4, HAS_BIAS=True, HAS_STATE=True, SILU=True, DPRE=False, EMU=False, BL=ct._BLOCK_L, BD=128, BW=4), 4),
        ("conv_bwd", ct.conv1d_bwd_kernel, {"x_ptr": x, "dx_ptr": x},
         dict(W=4, HAS_STATE=True, EMU=False, TILES=ct._TILES_PER_SPAN, BL=ct._BLOCK_L, BD=128, BW=4, BK=4), 4),
        # the other sides of the constexpr switches
        ("chunk_state_adjoint", sk.ssd_chunk_state_kernel, {"Y_ptr": x}, dict(fwd, ADJOINT=True, HAS_SEQ=False),
         cfg.warps),
        ("state_passing_plain", sk.ssd_state_passing_kernel, {},
         dict(HAS_INIT=False, HAS_SEQ=False, REVERSE=False, Q=cfg.chunk, BLOCK=256), cfg.warps_small),
        ("bwd_dx_plain", sk.ssd_bwd_dx_kernel, {"x_ptr": x, "dt_ptr": x, "B_ptr": x, "C_ptr": x, "dY_ptr": x,
                                                "dx_ptr": x},
         dict(bwd, HAS_D=True, D_VEC=True, HAS_BIAS=False, SOFTPLUS=False, DY_F32=False, HAS_SEQ=False, EMU=False),
         cfg.warps),
        ("bwd_dbc_plain", sk.ssd_bwd_dbc_kernel, {"x_ptr": x, "dY_ptr": x, "B_ptr": x, "C_ptr": x},
         dict(bwd, DY_F32=False, HAS_SEQ=False), cfg.warps),
        ("conv_fwd_dpre_W2", ct.conv1d_fwd_kernel, {"x_ptr": x, "dy_ptr": x},
         dict(W=2, HAS_BIAS=False, HAS_STATE=False, SILU=True, DPRE=True, EMU=False, BL=ct._BLOCK_L, BD=128, BW=1),
         4),
        ("conv_bwd_W1", ct.conv1d_bwd_kernel, {"x_ptr": x, "dx_ptr": x, "dpre_ptr": x},
         dict(W=1, HAS_STATE=False, EMU=False, TILES=ct._TILES_PER_SPAN, BL=ct._BLOCK_L, BD=128, BW=1, BK=1), 4),
    ]


SM90_SHARED_LIMIT = 232448  # bytes of shared memory one block may use on an H100/H200
MAX_SPILL = {"bwd_dx": 512, "bwd_dbc": 512, "bwd_dx_plain": 512, "bwd_dbc_plain": 512, "conv_bwd": 128}
# (bytes of register spill stores; every other kernel must not spill)


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_kernels_compile_for_sm90(dtype: str):
    """Every kernel compiles for sm_90 at the Mamba-2 configuration, fits an H100's shared memory,
    and stays within its register budget according to ptxas (run on the generated PTX)."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    report = {}
    for name, kernel, ptrs, constexprs, warps in _sm90_builds(dtype):
        sig = {n: "constexpr" if n in constexprs else ptrs.get(n, "*fp32" if n.endswith("_ptr") else "i32")
               for n in kernel.arg_names}
        attrs = {(kernel.arg_names.index(n),): [["tt.divisibility", 16]] for n in sig if n.endswith("_ptr")}
        compiled = triton.compile(ASTSource(kernel, sig, constexprs=constexprs, attrs=attrs),
                                  target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
        spill = None
        if os.path.exists(ptxas):
            with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
                f.write(compiled.asm["ptx"])
                f.flush()
                proc = subprocess.run([ptxas, "-arch=sm_90a", "-v", f.name, "-o", os.devnull],
                                      capture_output=True, text=True)
            assert proc.returncode == 0, f"{name}: ptxas failed\n{proc.stderr[-2000:]}"
            spill = int(re.search(r"(\d+) bytes spill stores", proc.stderr).group(1))
        report[name] = (compiled.metadata.shared, spill)
    too_big = {k: v for k, v in report.items() if v[0] > SM90_SHARED_LIMIT}
    spilling = {k: v for k, v in report.items() if v[1] is not None and v[1] > MAX_SPILL.get(k, 0)}
    assert not too_big and not spilling, f"(shared bytes, spill bytes) per kernel: {report}"


@pytest.mark.gpu
class TestOnCuda:
    """The same comparisons compiled for the GPU at model sizes (skipped without CUDA)."""

    @pytest.fixture(autouse=True)
    def _compiled(self):
        if os.environ.get("TRITON_INTERPRET") == "1":
            pytest.skip("TRITON_INTERPRET=1 would run these sizes in the interpreter")

    @pytest.mark.parametrize("case", GPU_SSD_CASES, ids=[c.id for c in GPU_SSD_CASES])
    def test_ssd_matches_ref(self, case):
        _check(case, {"errors": compare_ssd(case, "cuda")})

    @pytest.mark.parametrize("case", GPU_CONV_CASES, ids=[c.id for c in GPU_CONV_CASES])
    def test_conv_matches_ref(self, case):
        _check(case, {"errors": compare_conv(case, "cuda")})

    def test_backward_is_deterministic(self):
        case = GPU_SSD_CASES[2]
        ins, seq_idx, cot = ssd_inputs(case, "cuda")
        runs = [run_ssd(case, ins, seq_idx, cot, case.dtype, "triton") for _ in range(2)]
        for k in runs[0]:
            if not k.startswith("_"):
                assert torch.equal(runs[0][k], runs[1][k]), k

    def test_auto_picks_triton_on_cuda(self):
        from mz_kernels.conv1d import _auto as conv_auto
        from mz_kernels.ssd import _auto as ssd_auto

        cuda = torch.device("cuda")
        assert ssd_auto(cuda, BF16, 2048) == "triton" and conv_auto(cuda, BF16) == "triton"
        assert ssd_auto(cuda, torch.float64, 2048) == "chunked" and conv_auto(cuda, torch.float64) == "ref"


if __name__ == "__main__":
    _child_main()
