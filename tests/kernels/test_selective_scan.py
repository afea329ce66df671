"""selective_scan: every fast backend against the float64 ``ref`` oracle on outputs, final state and all gradients."""
from __future__ import annotations

import pytest
import torch

from mz_kernels import backend_status, selective_scan, selective_scan_fn, selective_scan_step
from mz_kernels.testing import assert_close, make_scan_inputs

FAST = [b for b in ("chunked", "cpu") if backend_status()[b] is None]
NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")

# (id, (batch, L, D, N, G), options)
CASES = [
    ("L1-N16-G1", (2, 1, 8, 16, 1), {}),
    ("L67odd-N16-G2", (2, 67, 8, 16, 2), {}),
    ("L131-N1-G4", (1, 131, 12, 1, 4), {}),
    ("L200-N64-G1-nogate", (1, 200, 4, 64, 1), dict(gate=False)),
    ("L97-N16-G4-init", (2, 97, 8, 16, 4), dict(initial_state=True)),
    ("L70-N16-bare", (2, 70, 6, 16, 2), dict(skip=False, gate=False, bias=False, softplus=False)),
    ("L4096-N16-G2", (1, 4096, 4, 16, 2), dict(initial_state=True)),
    ("L64-N16-decay50", (2, 64, 8, 16, 1), dict(max_decay=50.0, initial_state=True)),
]


def run(inputs, backend, cot):
    softplus = inputs.pop("softplus", True)
    ins = inputs["ins"]
    y, h = selective_scan(**ins.kwargs(), delta_softplus=softplus, output_final_state=True, backend=backend)
    leaves = [t for t in ins.tensors() if t is not None]
    grads = torch.autograd.grad((y, h), leaves, (cot[0].to(y.dtype), cot[1].to(h.dtype)))
    it = iter(grads)
    return y, h, [None if t is None else next(it) for t in ins.tensors()]


def compare(shape, opts, backend, dtype, tol):
    opts = dict(opts)
    softplus = opts.pop("softplus", True)
    base = make_scan_inputs(*shape, seed=sum(shape), **opts)
    if not softplus:  # without softplus the step sizes must already be positive
        base.delta = torch.nn.functional.softplus(base.delta)
    torch.manual_seed(1)
    cot = (torch.randn(shape[0], shape[1], shape[2], dtype=torch.float64), torch.randn(shape[0], shape[2], shape[3], dtype=torch.float64))
    ref_ins = base.cast(dtype).cast(torch.float64)  # the oracle sees exactly the (rounded) values the fast path sees
    y0, h0, g0 = run({"ins": ref_ins, "softplus": softplus}, "ref", cot)
    y1, h1, g1 = run({"ins": base.cast(dtype), "softplus": softplus}, backend, cot)
    assert y1.dtype == dtype and h1.dtype == torch.float32
    assert_close("y", y1, y0, tol)
    assert_close("final_state", h1, h0, tol)
    for name, a, b in zip(NAMES, g1, g0):
        assert_close(f"d{name}", a, b, tol)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("shape,opts", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_fp32_matches_ref(backend, shape, opts):
    compare(shape, opts, backend, torch.float32, 1e-5)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("shape,opts", [c[1:] for c in CASES[:5]], ids=[c[0] for c in CASES[:5]])
def test_bf16_inputs_match_ref(backend, shape, opts):
    compare(shape, opts, backend, torch.bfloat16, 5e-3)


@pytest.mark.parametrize("opts", [dict(), dict(initial_state=True, gate=False)], ids=["gate", "init-nogate"])
def test_ref_gradcheck_float64(opts):
    ins = make_scan_inputs(2, 5, 4, 3, 2, seed=3, **opts).cast(torch.float64)
    present = [t for t in ins.tensors() if t is not None]

    def f(*ts):
        it = iter(ts)
        kw = {k: (None if v is None else next(it)) for k, v in ins.kwargs().items()}
        return selective_scan(**kw, output_final_state=True, backend="ref")

    assert torch.autograd.gradcheck(f, present, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["ref", *FAST])
def test_large_decay_is_finite(backend):
    ins = make_scan_inputs(2, 48, 8, 16, 1, max_decay=50.0, seed=5).cast(torch.float32)
    ins.delta.data.add_(40.0)  # dt * |A| up to ~2000 per step: exp underflows to exactly 0, never NaN
    y, h = selective_scan(**ins.kwargs(), output_final_state=True, backend=backend)
    (y.sum() + h.sum()).backward()
    for t in [y, h, *(x.grad for x in ins.tensors() if x is not None)]:
        assert torch.isfinite(t).all()


def test_step_matches_full_sequence():
    ins = make_scan_inputs(2, 37, 8, 16, 2, initial_state=True, seed=7).cast(torch.float32, requires_grad=False)
    y, h = selective_scan(**ins.kwargs(), output_final_state=True, backend="ref")
    state = ins.initial_state
    for t in range(37):
        yt, state = selective_scan_step(
            state, ins.u[:, t], ins.delta[:, t], ins.A, ins.B[:, t], ins.C[:, t], D=ins.D, z=ins.z[:, t], delta_bias=ins.delta_bias
        )
        assert_close(f"y[{t}]", yt, y[:, t], 1e-6)
    assert_close("final_state", state, h, 1e-6)


def test_chained_calls_equal_one_call():
    ins = make_scan_inputs(2, 90, 8, 16, 2, seed=8).cast(torch.float32, requires_grad=False)
    y, h = selective_scan(**ins.kwargs(), output_final_state=True, backend="chunked")
    kw = ins.kwargs()
    first = {k: (v[:, :41] if k in ("u", "delta", "z", "B", "C") else v) for k, v in kw.items()}
    second = {k: (v[:, 41:].contiguous() if k in ("u", "delta", "z", "B", "C") else v) for k, v in kw.items()}
    ya, ha = selective_scan(**{**first, **{k: v.contiguous() for k, v in first.items() if v is not None}}, output_final_state=True)
    yb, hb = selective_scan(**{**second, "initial_state": ha}, output_final_state=True)
    assert_close("y", torch.cat([ya, yb], 1), y, 1e-5)
    assert_close("final_state", hb, h, 1e-5)


@pytest.mark.parametrize("layout", ["BNL", "BGNL", "DN"])
def test_mamba_layout_adapter(layout):
    torch.manual_seed(0)
    Bsz, Dm, L, N = 2, 6, 33, 4
    u, delta, z = (torch.randn(Bsz, Dm, L) for _ in range(3))
    A = -torch.rand(Dm, N) - 0.5
    if layout == "BNL":
        Bm, Cm = torch.randn(Bsz, N, L), torch.randn(Bsz, N, L)
        Bc, Cc = Bm.permute(0, 2, 1)[:, :, None], Cm.permute(0, 2, 1)[:, :, None]
    elif layout == "BGNL":
        Bm, Cm = torch.randn(Bsz, 3, N, L), torch.randn(Bsz, 3, N, L)
        Bc, Cc = Bm.permute(0, 3, 1, 2), Cm.permute(0, 3, 1, 2)
    else:
        Bm, Cm = torch.randn(Dm, N), torch.randn(Dm, N)
        Bc, Cc = Bm.expand(Bsz, L, Dm, N), Cm.expand(Bsz, L, Dm, N)
    out, last = selective_scan_fn(u, delta, A, Bm, Cm, z=z, return_last_state=True)
    y, h = selective_scan(
        u.transpose(1, 2).contiguous(), delta.transpose(1, 2).contiguous(), A, Bc.contiguous(), Cc.contiguous(),
        z=z.transpose(1, 2).contiguous(), delta_softplus=False, output_final_state=True, backend="ref",
    )
    assert out.shape == (Bsz, Dm, L)
    assert_close("out", out, y.transpose(1, 2), 1e-5)
    assert_close("last_state", last, h, 1e-5)


def _block(x, W, A, backend):
    u, delta, z = (x @ W).chunk(3, -1)
    Bm = x[..., :4].unsqueeze(2).contiguous()
    Cm = x[..., 4:8].unsqueeze(2).contiguous()
    y, h = selective_scan(u.contiguous(), delta.contiguous(), A, Bm, Cm, z=z.contiguous(), output_final_state=True, backend=backend)
    return y.sum(-1) + h.sum()


@pytest.mark.parametrize("backend", ["ref", *FAST])
def test_torch_compile_fullgraph(backend):
    torch.manual_seed(0)
    x = torch.randn(2, 19, 8, requires_grad=True)
    W = torch.randn(8, 18, requires_grad=True)
    A = (-torch.rand(6, 4) - 0.1).requires_grad_()
    eager = _block(x, W, A, backend)
    ge = torch.autograd.grad(eager.sum(), (x, W, A))
    compiled = torch.compile(_block, fullgraph=True, backend="aot_eager")(x, W, A, backend)
    gc = torch.autograd.grad(compiled.sum(), (x, W, A))
    assert_close("out", compiled, eager, 1e-6)
    for a, b in zip(gc, ge):
        assert_close("grad", a, b, 1e-6)


@pytest.mark.slow
def test_torch_compile_inductor():
    torch.manual_seed(0)
    x = torch.randn(2, 19, 8, requires_grad=True)
    W = torch.randn(8, 18, requires_grad=True)
    A = (-torch.rand(6, 4) - 0.1).requires_grad_()
    eager = _block(x, W, A, "auto")
    compiled = torch.compile(_block, fullgraph=True)(x, W, A, "auto")
    assert_close("out", compiled, eager, 1e-5)


def _good(**over):
    ins = make_scan_inputs(2, 10, 8, 4, 2, seed=0).cast(torch.float32, requires_grad=False).kwargs()
    ins.update(over)
    return ins


@pytest.mark.parametrize(
    "over,match",
    [
        (dict(u=torch.randn(2, 10)), r"u must have 3 dims \[B, L, D\], got 2"),
        (dict(delta=torch.randn(2, 11, 8)), r"delta must have shape \[B, L, D\] = \[2, 10, 8\], got \(2, 11, 8\)"),
        (dict(B=torch.randn(2, 10, 3, 4), C=torch.randn(2, 10, 3, 4)), r"divisible by the number of groups G = 3"),
        (dict(C=torch.randn(2, 9, 2, 4)), r"C must have shape"),
        (dict(A=torch.randn(8, 5)), r"B must have shape \[B, L, G, N\] = \[2, 10, \*, 5\]"),
        (dict(initial_state=torch.randn(2, 8, 4, dtype=torch.float16)), r"initial_state must have dtype in \(float32, float64\), got float16"),
        (dict(u=torch.randn(2, 8, 10).transpose(1, 2)), r"u must be contiguous"),
        (dict(z=torch.randn(2, 10, 8, dtype=torch.float64)), r"z must have dtype in \(float32\), got float64"),
        (dict(backend="cuda"), r"backend must be one of \['auto', 'ref', 'chunked', 'cpu', 'triton'\], got 'cuda'"),
    ],
    ids=["rank", "length", "groups", "C-length", "N-mismatch", "fp16-state", "non-contiguous", "z-dtype", "backend"],
)
def test_bad_input(over, match):
    with pytest.raises(ValueError, match=match):
        selective_scan(**_good(**over))


def test_env_override(monkeypatch):
    monkeypatch.setenv("MZ_SCAN_BACKEND", "ref")
    y, _ = selective_scan(**_good())
    monkeypatch.setenv("MZ_SCAN_BACKEND", "chunked")
    y2, _ = selective_scan(**_good())
    assert_close("y", y2, y, 1e-5)
    monkeypatch.setenv("MZ_SCAN_BACKEND", "bogus")
    with pytest.raises(ValueError, match="MZ_SCAN_BACKEND must be one of"):
        selective_scan(**_good())
