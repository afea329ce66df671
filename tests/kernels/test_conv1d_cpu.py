"""The ``cpu`` (C) backend of causal_conv1d against the float64 reference: outputs, final states and
every gradient, across block boundaries (256 steps), short sequences, widths 1-4, states, dtypes."""
from __future__ import annotations

import pytest
import torch

from mz_kernels._backend import unavailable_reason
from mz_kernels.conv1d import causal_conv1d

pytestmark = pytest.mark.skipif(unavailable_reason("cpu") is not None, reason="no C compiler for the cpu backend")


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    return (got - want).norm().item() / max(want.norm().item(), 1e-30)


def run(backend: str, x, weight, bias, act, state, gy, gfinal):
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (x, weight, bias, state)]
    y, final = causal_conv1d(*leaves[:3], act, leaves[3], output_final_state=True, backend=backend)
    (y.double() * gy).sum().add((final.double() * gfinal).sum()).backward()
    return y, final, [None if t is None else t.grad for t in leaves]


CASES = [  # (B, L, D, W)
    (1, 1, 3, 4),
    (2, 2, 5, 4),  # L < W - 1: the final state reaches into the initial state
    (2, 17, 7, 3),
    (3, 257, 9, 4),  # one step past a block
    (1, 600, 33, 2),
    (2, 64, 4, 1),  # W = 1: no state
]


@pytest.mark.parametrize("with_state", [False, True], ids=["zeros", "state"])
@pytest.mark.parametrize("act", [None, "silu"], ids=["linear", "silu"])
@pytest.mark.parametrize("shape", CASES, ids=[f"B{b}-L{l}-D{d}-W{w}" for b, l, d, w in CASES])
def test_cpu_matches_float64_reference(shape, act, with_state) -> None:
    B, L, D, W = shape
    if with_state and W == 1:
        pytest.skip("W = 1 has no state")
    g = torch.Generator().manual_seed(L * 31 + D)
    x = torch.randn(B, L, D, generator=g)
    weight, bias = torch.randn(D, W, generator=g), torch.randn(D, generator=g)
    state = torch.randn(B, D, W - 1, generator=g) if with_state else None
    gy, gfinal = torch.randn(B, L, D, generator=g, dtype=torch.float64), torch.randn(B, D, W - 1, generator=g, dtype=torch.float64)
    y, final, grads = run("cpu", x, weight, bias, act, state, gy, gfinal)
    dbl = [None if t is None else t.double() for t in (x, weight, bias, state)]
    y_ref, final_ref, grads_ref = run("ref", *dbl[:3], act, dbl[3], gy, gfinal)
    assert y.dtype == torch.float32 and rel_err(y, y_ref) <= 1e-6
    assert torch.equal(final.double(), final_ref)
    for name, got, want in zip(("x", "weight", "bias", "initial_state"), grads, grads_ref):
        if want is None:
            assert got is None
        else:
            assert rel_err(got, want) <= 1e-5, name


def test_cpu_bfloat16_and_thread_independence() -> None:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 300, 16, generator=g).bfloat16()
    weight, bias = torch.randn(16, 4, generator=g), torch.randn(16, generator=g)
    y, _ = causal_conv1d(x, weight, bias, "silu", backend="cpu")
    y_ref, _ = causal_conv1d(x.double(), weight.double(), bias.double(), "silu", backend="ref")
    assert y.dtype == torch.bfloat16 and rel_err(y, y_ref) <= 5e-3
    xs = torch.randn(2, 600, 32, generator=g, requires_grad=True)
    w = weight.repeat(2, 1).requires_grad_(True)
    outs = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            y, _ = causal_conv1d(xs, w, None, "silu", backend="cpu")
            (gx, gw) = torch.autograd.grad(y.square().sum(), (xs, w))
            outs.append((y, gx, gw))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_auto_picks_cpu_on_cpu() -> None:
    from mz_kernels.conv1d import _auto

    assert _auto(torch.device("cpu"), torch.float32) == "cpu"
    assert _auto(torch.device("cpu"), torch.float64) == "ref"
