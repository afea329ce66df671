"""Causal depthwise conv1d: against a naive loop, gradcheck, streaming steps, chaining and bad input."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mz_kernels.conv1d import causal_conv1d, causal_conv1d_step


def make(b: int, length: int, d: int, width: int, seed: int = 0, dtype: torch.dtype = torch.float64):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, length, d, generator=gen, dtype=torch.float64).to(dtype)
    weight = torch.randn(d, width, generator=gen, dtype=torch.float64)
    bias = torch.randn(d, generator=gen, dtype=torch.float64)
    state = torch.randn(b, d, width - 1, generator=gen, dtype=torch.float64)
    return x, weight, bias, state


def naive_conv(x, weight, bias, activation, state):
    """Loop over t and k in float64; returns (y, last W-1 inputs)."""
    b, length, d = x.shape
    width = weight.shape[1]
    hist = torch.zeros(b, width - 1, d, dtype=torch.float64) if state is None else state.double().transpose(1, 2)
    xs = torch.cat([hist, x.double()], dim=1)  # position t of x sits at t + W - 1
    y = torch.zeros(b, length, d, dtype=torch.float64)
    for t in range(length):
        for k in range(width):
            y[:, t] += weight[:, k].double() * xs[:, t + k]
        if bias is not None:
            y[:, t] += bias.double()
    if activation == "silu":
        y = y * torch.sigmoid(y)
    return y, xs[:, length:].transpose(1, 2)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    return (got - want).norm().item() / want.norm().item()


@pytest.mark.parametrize("with_state", [False, True], ids=["zeros", "initial-state"])
@pytest.mark.parametrize("activation", [None, "silu"], ids=["linear", "silu"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("width", [2, 4], ids=["W2", "W4"])
def test_matches_naive_loop(width: int, with_bias: bool, activation: str | None, with_state: bool) -> None:
    x, weight, bias, state = make(3, 17, 5, width, seed=width)
    x, weight, bias, state = x.float(), weight.float(), bias.float(), state.float()
    bias = bias if with_bias else None
    state = state if with_state else None
    y, final = causal_conv1d(x, weight, bias, activation, state, output_final_state=True)
    y_ref, final_ref = naive_conv(x, weight, bias, activation, state)
    assert y.dtype == torch.float32 and final.shape == (3, 5, width - 1)
    assert rel_err(y, y_ref) <= 1e-6
    assert torch.equal(final.double(), final_ref)


def test_matches_torch_conv1d_bfloat16() -> None:
    x, weight, bias, _ = make(2, 33, 7, 4, seed=1, dtype=torch.bfloat16)
    y, final = causal_conv1d(x, weight.float(), bias.float(), "silu", output_final_state=True)
    pre = F.conv1d(x.double().transpose(1, 2), weight[:, None], bias, padding=3, groups=7)[..., :33]
    assert y.dtype == torch.bfloat16 and final.dtype == torch.float32
    assert rel_err(y, F.silu(pre).transpose(1, 2)) <= 5e-3
    assert torch.equal(final, x[:, -3:].float().transpose(1, 2))


@pytest.mark.parametrize(
    "b,length,d,width", [(2, 6, 3, 4), (1, 2, 2, 4), (2, 5, 3, 1)], ids=["L6-W4", "L2-shorter-than-state-W4", "W1"]
)
def test_gradcheck_float64(b: int, length: int, d: int, width: int) -> None:
    x, weight, bias, state = make(b, length, d, width, seed=2)
    leaves = tuple(t.clone().requires_grad_(True) for t in (x, weight, bias, state))

    def fn(x, weight, bias, state):
        return causal_conv1d(x, weight, bias, "silu", state, output_final_state=True)

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("activation", [None, "silu"], ids=["linear", "silu"])
@pytest.mark.parametrize("width", [2, 4], ids=["W2", "W4"])
def test_steps_match_full_sequence(width: int, activation: str | None) -> None:
    x, weight, bias, state = (t.float() for t in make(2, 11, 6, width, seed=3))
    y, final = causal_conv1d(x, weight, bias, activation, state, output_final_state=True)
    ys, s = [], state
    for t in range(x.shape[1]):
        y_t, s = causal_conv1d_step(s, x[:, t], weight, bias, activation)
        ys.append(y_t)
    assert rel_err(torch.stack(ys, dim=1), y) <= 1e-6
    assert torch.equal(s, final)


@pytest.mark.parametrize("cut", [1, 2, 7], ids=["cut1-shorter-than-state", "cut2", "cut7"])
def test_two_halves_chain_equals_one_call(cut: int) -> None:
    x, weight, bias, state = (t.float() for t in make(2, 13, 5, 4, seed=4))
    y, final = causal_conv1d(x, weight, bias, "silu", state, output_final_state=True)
    y1, s1 = causal_conv1d(x[:, :cut].contiguous(), weight, bias, "silu", state, output_final_state=True)
    y2, s2 = causal_conv1d(x[:, cut:].contiguous(), weight, bias, "silu", s1, output_final_state=True)
    assert rel_err(torch.cat([y1, y2], dim=1), y) <= 1e-6
    assert torch.equal(s2, final)


def test_final_state_dropped_unless_requested() -> None:
    x, weight, _, _ = make(1, 4, 2, 3)
    y, final = causal_conv1d(x, weight)
    assert final is None and y.shape == x.shape


def _valid() -> dict:
    x, weight, bias, state = (t.float() for t in make(2, 9, 4, 3))
    return dict(x=x, weight=weight, bias=bias, activation="silu", initial_state=state)


BAD = [
    ("x-rank-2", dict(x=torch.zeros(2, 9)), r"x must have 3 dims \[B, L, D\], got 2"),
    ("weight-channels", dict(weight=torch.zeros(5, 3)), r"weight must have shape \[D, W\] = \[4, \*\], got \(5, 3\)"),
    ("weight-rank-3", dict(weight=torch.zeros(4, 1, 3)), r"weight must have 2 dims \[D, W\], got 3"),
    ("bias-size", dict(bias=torch.zeros(3)), r"bias must have shape \[D\] = \[4\], got \(3,\)"),
    ("state-width", dict(initial_state=torch.zeros(2, 4, 3)), r"initial_state must have shape .*got \(2, 4, 3\)"),
    ("state-batch", dict(initial_state=torch.zeros(3, 4, 2)), r"initial_state must have shape .*got \(3, 4, 2\)"),
    ("fp16-state", dict(initial_state=torch.zeros(2, 4, 2, dtype=torch.float16)),
     r"initial_state must have dtype in \(float32, float64\), got float16"),
    ("non-contiguous-x", dict(x=torch.zeros(2, 4, 9).transpose(1, 2)), r"x must be contiguous"),
    ("bad-activation", dict(activation="relu"), r"activation must be one of \[None, 'silu'\], got 'relu'"),
    ("empty-sequence", dict(x=torch.zeros(2, 0, 4)), r"x must have sequence length L >= 1, got shape \(2, 0, 4\)"),
    ("zero-width", dict(weight=torch.zeros(4, 0), initial_state=None), r"weight must have kernel width W >= 1"),
    ("x-int", dict(x=torch.zeros(2, 9, 4, dtype=torch.int64)), r"x must have dtype in .*got int64"),
]


@pytest.mark.parametrize("change,pattern", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_causal_conv1d_rejects_bad_input(change: dict, pattern: str) -> None:
    kw = {**_valid(), **change}
    with pytest.raises(ValueError, match=r"^causal_conv1d: " + pattern):
        causal_conv1d(**kw)


BAD_STEP = [
    ("x-rank-3", dict(x=torch.zeros(2, 1, 4)), r"x must have 2 dims \[B, D\], got 3"),
    ("state-width", dict(state=torch.zeros(2, 4, 3)), r"state must have shape \[B, D, W-1\] = \[2, 4, 2\], got"),
    ("bf16-state", dict(state=torch.zeros(2, 4, 2, dtype=torch.bfloat16)), r"state must have dtype"),
    ("bad-activation", dict(activation="gelu"), r"activation must be one of \[None, 'silu'\], got 'gelu'"),
]


@pytest.mark.parametrize("change,pattern", [c[1:] for c in BAD_STEP], ids=[c[0] for c in BAD_STEP])
def test_causal_conv1d_step_rejects_bad_input(change: dict, pattern: str) -> None:
    v = _valid()
    kw = {"state": v["initial_state"], "x": v["x"][:, 0], "weight": v["weight"], "bias": v["bias"], **change}
    with pytest.raises(ValueError, match=r"^causal_conv1d_step: " + pattern):
        causal_conv1d_step(**kw)
