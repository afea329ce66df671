"""The fused C ``cpu`` selective-scan backend: against the float64 ``ref`` oracle (outputs, final state,
every gradient), determinism, its compile-on-first-use machinery and fallback, and the benchmark CLI."""
from __future__ import annotations

import ctypes
import importlib
import json
import os
import subprocess
import sys
import textwrap
import threading

import pytest
import torch

from mz_kernels import backend_status, selective_scan
from mz_kernels._cbuild import CBuildError, load_library
from mz_kernels.testing import assert_close, make_scan_inputs

cpu = importlib.import_module("mz_kernels.selective_scan.cpu")
pytestmark = pytest.mark.skipif(backend_status()["cpu"] is not None, reason=f"cpu backend: {backend_status()['cpu']}")

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")

# (id, (batch, L, D, N, G), options for make_scan_inputs; "softplus"/"positive_A" handled here)
CASES = [
    ("L1-N16-G1", (2, 1, 24, 16, 1), {}),
    ("L67-N16-G2-init", (2, 67, 40, 16, 2), dict(initial_state=True)),
    ("L129-N1-G4-D36", (3, 129, 36, 1, 4), {}),
    ("L200-N64-G1-nogate", (1, 200, 20, 64, 1), dict(gate=False)),
    ("L131-N16-G2-bare-nosoftplus", (2, 131, 24, 16, 2), dict(skip=False, gate=False, bias=False, softplus=False)),
    ("L97-N16-G1-D300-3blocks", (2, 97, 300, 16, 1), dict(initial_state=True)),
    ("L75-N1-G4-D392-multiblock", (8, 75, 392, 1, 4), dict(gate=False, initial_state=True)),
    ("L70-N4-G2-D66-partial", (1, 70, 66, 4, 2), {}),
    ("L4096-N16-G2", (1, 4096, 6, 16, 2), dict(initial_state=True)),
    ("L64-N16-decay50", (2, 64, 8, 16, 1), dict(max_decay=50.0, initial_state=True)),
    ("L45-N16-positiveA", (2, 45, 8, 16, 2), dict(positive_A=True)),
]
BF16_CASES = [CASES[i] for i in (1, 2, 6, 7)]


def _inputs(shape, opts):
    opts = dict(opts)
    softplus = opts.pop("softplus", True)
    positive = opts.pop("positive_A", False)
    ins = make_scan_inputs(*shape, seed=sum(shape), **opts)
    if not softplus:  # without softplus the step sizes must already be positive
        ins.delta = torch.nn.functional.softplus(ins.delta)
    if positive:  # some growing modes: exp(dt * A) > 1
        ins.A = ins.A.abs().clamp(max=1.0) * torch.where(torch.arange(shape[3]) % 3 == 0, 0.3, -1.0)
    return ins, softplus


def _run(ins, softplus, backend, cot):
    y, h = selective_scan(**ins.kwargs(), delta_softplus=softplus, output_final_state=True, backend=backend)
    leaves = [t for t in ins.tensors() if t is not None]
    grads = iter(torch.autograd.grad((y, h), leaves, (cot[0].to(y.dtype), cot[1].to(h.dtype))))
    return y, h, [None if t is None else next(grads) for t in ins.tensors()]


def _compare(shape, opts, dtype, tol):
    base, softplus = _inputs(shape, opts)
    cast = base.cast(dtype)
    g = torch.Generator().manual_seed(1)
    Bsz, L, D, N, _ = shape
    cot = (torch.randn(Bsz, L, D, generator=g, dtype=torch.float64), torch.randn(Bsz, D, N, generator=g, dtype=torch.float64))
    y0, h0, g0 = _run(base.cast(dtype).cast(torch.float64), softplus, "ref", cot)  # oracle on the same rounded values
    y1, h1, g1 = _run(cast, softplus, "cpu", cot)
    assert y1.dtype == dtype and h1.dtype == torch.float32
    assert_close("y", y1, y0, tol)
    assert_close("final_state", h1, h0, tol)
    for name, a, b in zip(NAMES, g1, g0):
        if a is not None:
            assert a.dtype == getattr(cast, name).dtype, f"d{name} dtype"
        assert_close(f"d{name}", a, b, tol)


@pytest.mark.parametrize("shape,opts", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_fp32_matches_ref(shape, opts):
    _compare(shape, opts, torch.float32, 1e-5)


@pytest.mark.parametrize("shape,opts", [c[1:] for c in BF16_CASES], ids=[c[0] for c in BF16_CASES])
def test_bf16_inputs_match_ref(shape, opts):
    _compare(shape, opts, torch.bfloat16, 5e-3)


def test_fp16_inputs_match_ref():
    _compare((2, 50, 32, 16, 2), {}, torch.float16, 5e-3)


def test_huge_steps_stay_finite():
    ins = make_scan_inputs(2, 70, 20, 16, 2, max_decay=50.0, seed=5).cast(torch.float32)
    ins.delta.data.add_(60.0)  # dt * |A| up to ~3000 per step: the decay underflows to 0
    y, h, grads = _run(ins, True, "cpu", (torch.randn(2, 70, 20), torch.randn(2, 20, 16)))
    for t in [y, h, *(x for x in grads if x is not None)]:
        assert torch.isfinite(t).all()


def test_backward_is_bit_reproducible_and_thread_count_independent():
    ins = make_scan_inputs(3, 140, 200, 16, 2, initial_state=True, seed=11).cast(torch.float32)
    cot = (torch.randn(3, 140, 200), torch.randn(3, 200, 16))
    threads = torch.get_num_threads()
    try:
        runs = []
        for n in (threads, threads, 1):
            torch.set_num_threads(n)
            runs.append(_run(ins, True, "cpu", cot))
    finally:
        torch.set_num_threads(threads)
    first = [runs[0][0], runs[0][1], *runs[0][2]]
    for other in runs[1:]:
        for a, b in zip(first, [other[0], other[1], *other[2]]):
            assert torch.equal(a, b)


def test_backward_without_saved_states_recomputes_them():
    ins = make_scan_inputs(2, 100, 24, 16, 2, initial_state=True, seed=4).cast(torch.float32, requires_grad=False)
    args = ins.tensors()
    y, h, saved = cpu.forward(*args, True, True)
    empty = torch.empty(2, 0, 24, 16)
    assert cpu.forward(*args, True, False)[2].shape == empty.shape
    gy, gh = torch.randn_like(y), torch.randn_like(h)
    with_saved = cpu.backward(gy, gh, saved, *args, True)
    recomputed = cpu.backward(gy, gh, empty, *args, True)
    for a, b in zip(with_saved, recomputed):
        assert (a is None and b is None) or torch.equal(a, b)


def test_plan_respects_groups_and_cache_budget():
    for Bsz, D, G, N in [(8, 768, 2, 16), (8, 384, 4, 1), (32, 1540, 1, 16), (1, 6, 2, 16), (8, 392, 4, 1)]:
        bw, bpu = cpu.plan(Bsz, D, G, N, 2048)
        Dg = D // G
        assert 1 <= bw <= Dg and (bw % 16 == 0 or bw == Dg)
        assert bpu == 1 or bpu * N * -(-bw // 16) * 16 <= 2048
    # the test cases above exercise several blocks per unit (N = 1) and per group (D = 300)
    assert cpu.plan(8, 392, 4, 1, 2048)[1] > 1 and cpu.plan(8, 392, 4, 1, 1024)[1] > 1
    assert cpu.plan(2, 300, 1, 16, 2048)[0] < 300 and cpu.plan(2, 300, 1, 16, 1024)[0] < 300


def test_loading_keeps_denormals():
    # a -ffast-math shared library would switch on flush-to-zero for the whole process
    cpu.library()
    assert (torch.tensor([1e-39]) * 0.5).item() != 0.0


def _block(x, W, A):
    u, delta, z = (x @ W).chunk(3, -1)
    Bm = x[..., :4].unsqueeze(2).contiguous()
    Cm = x[..., 4:8].unsqueeze(2).contiguous()
    y, h = selective_scan(u.contiguous(), delta.contiguous(), A, Bm, Cm, z=z.contiguous(), output_final_state=True, backend="cpu")
    return y.sum(-1) + h.sum()


def test_torch_compile_fullgraph():
    torch.manual_seed(0)
    x = torch.randn(2, 37, 8, requires_grad=True)
    W = torch.randn(8, 18, requires_grad=True)
    A = (-torch.rand(6, 4) - 0.1).requires_grad_()
    eager = _block(x, W, A)
    ge = torch.autograd.grad(eager.sum(), (x, W, A))
    compiled = torch.compile(_block, fullgraph=True, backend="aot_eager")(x, W, A)
    gc = torch.autograd.grad(compiled.sum(), (x, W, A))
    assert_close("out", compiled, eager, 1e-6)
    for name, a, b in zip(("dx", "dW", "dA"), gc, ge):
        assert_close(name, a, b, 1e-6)


# ---------------------------------------------------------------- build machinery and fallback

def test_cbuild_builds_caches_and_falls_back_on_flags(tmp_path, monkeypatch):
    src = tmp_path / "add.c"
    src.write_text("int mz_add(int a, int b) { return a + b; }\n")
    monkeypatch.setenv("MZ_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr("mz_kernels._cbuild.FLAG_VARIANTS", (("-fno-such-flag-mz",), ()))
    lib = load_library(src)
    assert lib.mz_add(2, 40) == 42
    assert load_library(src) is lib
    assert len(list((tmp_path / "cache").glob("add-*.so"))) == 1


def test_cbuild_concurrent_builds_replace_atomically(tmp_path):
    from mz_kernels import _cbuild

    src = tmp_path / "mul.c"
    src.write_text("int mz_mul(int a, int b) { return a * b; }\n")
    target = tmp_path / "cache" / "mul.so"
    cc = _cbuild.find_compiler()
    threads = [threading.Thread(target=_cbuild._build, args=(cc, src, target)) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [p.name for p in target.parent.iterdir()] == ["mul.so"]  # no temporary files left behind
    assert ctypes.CDLL(str(target)).mz_mul(6, 7) == 42


@pytest.mark.parametrize(
    "flags,openmp",
    [(("-march=native",), 0), (("-fopenmp",), 1)],
    ids=["native-no-openmp-threadpool", "portable-vectors-no-march"],
)
def test_fallback_builds_match_ref(tmp_path, monkeypatch, flags, openmp):
    monkeypatch.setenv("MZ_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr("mz_kernels._cbuild.FLAG_VARIANTS", (flags,))
    monkeypatch.setattr("mz_kernels._cbuild._loaded", {})
    monkeypatch.setattr(cpu, "_lib", None)
    assert cpu.library().mz_scan_has_openmp() == openmp  # without OpenMP a Python thread pool splits the units
    for _, shape, opts in (CASES[5], CASES[6]):
        _compare(shape, opts, torch.float32, 1e-5)


def test_cbuild_reports_compile_errors_in_one_line(tmp_path, monkeypatch):
    src = tmp_path / "broken.c"
    src.write_text("int f(void) { return undefined_name; }\n")
    monkeypatch.setenv("MZ_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(CBuildError, match=r"C build of broken.c failed: .*undefined_name") as err:
        load_library(src)
    assert "\n" not in str(err.value)


_FALLBACK = textwrap.dedent(
    """
    import json, warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import torch
        from mz_kernels import backend_status, selective_scan
        from mz_kernels.testing import make_scan_inputs
        ins = make_scan_inputs(2, 33, 8, 4, 2, seed=2)
        y1, _ = selective_scan(**ins.kwargs(), backend="auto")
        y2, _ = selective_scan(**ins.kwargs(), backend="auto")
        yr, _ = selective_scan(**ins.kwargs(), backend="ref")
        try:
            selective_scan(**ins.kwargs(), backend="cpu")
            explicit = "no error"
        except ValueError as e:
            explicit = str(e)
    print(json.dumps({
        "reason": backend_status()["cpu"],
        "warnings": [str(w.message) for w in caught if "'cpu'" in str(w.message)],
        "err": float((y1 - yr).abs().max()), "same": bool(torch.equal(y1, y2)), "explicit": explicit,
    }))
    """
)


def test_missing_compiler_falls_back_with_one_warning(tmp_path):
    env = {**os.environ, "CC": "/nonexistent/cc", "MZ_CACHE_DIR": str(tmp_path), "MZ_SCAN_BACKEND": ""}
    out = subprocess.run([sys.executable, "-c", _FALLBACK], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["reason"] == "C compiler $CC='/nonexistent/cc' not found"
    assert len(res["warnings"]) == 1 and "/nonexistent/cc" in res["warnings"][0]
    assert res["err"] < 1e-5 and res["same"]
    assert "backend 'cpu' is unavailable: C compiler $CC='/nonexistent/cc' not found" in res["explicit"]


# ---------------------------------------------------------------- benchmark CLI

def test_bench_smoke(tmp_path, capsys):
    from mz_kernels.bench import main

    path = tmp_path / "bench.json"
    threads = torch.get_num_threads()
    try:
        rc = main(["--shapes", "2x67x32x4x2", "--backends", "ref,cpu", "--repeat", "1", "--warmup", "0", "--threads", "1", "--json", str(path)])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    table = capsys.readouterr().out
    assert "fwd ms" in table and "2x67x32x4x2   cpu" in table
    report = json.loads(path.read_text())
    rows = {r["backend"]: r for r in report["rows"]}
    assert rows["cpu"]["status"] == "ok" and rows["cpu"]["fwd_s"] > 0 and rows["cpu"]["speedup_fwd"] > 0
    assert rows["cpu"]["y_rel_err"] < 1e-5 and rows["cpu"]["peak_fwd_bytes"] >= 2 * 67 * 32 * 4
    assert report["exp_elem_per_s"]["2x67x32x4x2"] > 0


def test_bench_rejects_bad_shape(capsys):
    from mz_kernels.bench import main

    assert main(["--shapes", "2x67x33x4x2"]) == 2
    assert "D = 33 must be divisible by G = 2" in capsys.readouterr().out
