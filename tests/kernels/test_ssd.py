"""Mamba-2 SSD scan: chunked vs the float64 sequential oracle (outputs, final state, every
gradient), packed sequences, single-step streaming, gradcheck, torch.compile and bad input."""
from __future__ import annotations

from dataclasses import dataclass, replace

import pytest
import torch

from mz_kernels.conv1d import causal_conv1d
from mz_kernels.ssd import ssd_scan, ssd_step
from mz_kernels.ssd.chunked import ssd_chunked, ssd_chunked_bwd

GRAD_NAMES = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_state")
PARAM_NAMES = ("A", "D", "dt_bias", "initial_state")  # kept float32 when the activations are bfloat16
TOL = {torch.float32: 1e-5, torch.bfloat16: 5e-3}


@dataclass(frozen=True)
class Case:
    id: str
    b: int = 2
    length: int = 37
    h: int = 4
    p: int = 3
    g: int = 2
    n: int = 5
    chunk: int = 16
    d_shape: str | None = "HP"  # "HP", "H" or None
    z: bool = True
    init: bool = True
    seqs: tuple[int, ...] | None = None  # lengths of packed sequences (sum = length)
    dt_softplus: bool = True
    max_decay: float | None = None  # when set: dt * |A| per step spans up to this value


CASES = [
    Case("L1", length=1),
    Case("L37-odd-chunk16-N5-G2-Dhp-z-init"),
    Case("L64-multiple-of-chunk16-N16-G1-Dh", length=64, g=1, n=16, d_shape="H"),
    Case("L101-chunk64-N16-G2-noD-noz-noinit", length=101, chunk=64, n=16, d_shape=None, z=False, init=False),
    Case("L23-chunk64-shorter-than-chunk-N1-G1", length=23, chunk=64, n=1, g=1, h=3),
    Case("L45-chunk16-seq_idx-3-packed", length=45, seqs=(11, 20, 14)),
    Case("L50-chunk16-seq_idx-boundary-on-chunk-edge", length=50, seqs=(16, 3, 31), g=1),
    Case("L150-chunk64-large-decay-50", length=150, chunk=64, n=16, dt_softplus=False, max_decay=50.0),
    Case("L33-chunk16-no-softplus-N1", length=33, n=1, dt_softplus=False, d_shape="H", init=False),
]


def make_inputs(case: Case, seed: int = 0) -> tuple[dict[str, torch.Tensor | None], torch.Tensor | None]:
    """float64 inputs keyed like ``ssd_scan`` arguments, and ``seq_idx`` (or None)."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=gen, dtype=torch.float64)

    b, L, h, p, g, n = case.b, case.length, case.h, case.p, case.g, case.n
    if case.max_decay is not None:
        dt = 0.5 + 0.5 * rand(b, L, h)  # used as is (no softplus)
        A = -case.max_decay * (0.5 + 0.5 * rand(h))
    else:
        dt = randn(b, L, h) - 1.0
        A = -(0.5 + rand(h))
    inputs: dict[str, torch.Tensor | None] = {
        "x": randn(b, L, h, p),
        "dt": dt,
        "A": A,
        "B": randn(b, L, g, n),
        "C": randn(b, L, g, n),
        "D": None if case.d_shape is None else randn(h, p) if case.d_shape == "HP" else randn(h),
        "z": randn(b, L, h, p) if case.z else None,
        "dt_bias": 0.5 * randn(h) if case.max_decay is None else None,
        "initial_state": randn(b, h, p, n) if case.init else None,
    }
    seq_idx = None
    if case.seqs is not None:
        ids = torch.repeat_interleave(torch.arange(len(case.seqs)), torch.tensor(case.seqs))
        seq_idx = ids[None].expand(b, -1).contiguous()
    return inputs, seq_idx


def cast(inputs: dict[str, torch.Tensor | None], dtype: torch.dtype) -> dict[str, torch.Tensor | None]:
    """Activations to ``dtype``; A, D, dt_bias and the state stay float32 unless ``dtype`` is float64."""
    param_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    return {k: None if v is None else v.to(param_dtype if k in PARAM_NAMES else dtype) for k, v in inputs.items()}


def cotangents(case: Case, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    dy = torch.randn(case.b, case.length, case.h, case.p, generator=gen, dtype=torch.float64)
    dfinal = torch.randn(case.b, case.h, case.p, case.n, generator=gen, dtype=torch.float64)
    return dy, dfinal


def scan_with_grads(
    inputs: dict[str, torch.Tensor | None],
    seq_idx: torch.Tensor | None,
    case: Case,
    backend: str,
    cot: tuple[torch.Tensor, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """``y``, ``final_state`` and ``d<name>`` for every present input."""
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in inputs.items() if v is not None}
    args = {k: leaves.get(k) for k in inputs}
    y, final = ssd_scan(
        args["x"], args["dt"], args["A"], args["B"], args["C"], chunk_size=case.chunk, D=args["D"], z=args["z"],
        dt_bias=args["dt_bias"], dt_softplus=case.dt_softplus, initial_state=args["initial_state"],
        seq_idx=seq_idx, output_final_state=True, backend=backend,
    )
    grads = torch.autograd.grad((y, final), list(leaves.values()), (cot[0].to(y.dtype), cot[1].to(final.dtype)))
    return {"y": y, "final_state": final, **{f"d{k}": gk for k, gk in zip(leaves, grads)}}


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    scale = want.norm().item()
    return (got - want).norm().item() / scale if scale > 0 else got.norm().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_chunked_matches_float64_ref(case: Case, dtype: torch.dtype) -> None:
    inputs, seq_idx = make_inputs(case)
    inputs = cast(inputs, dtype)
    cot = cotangents(case)
    got = scan_with_grads(inputs, seq_idx, case, "chunked", cot)
    want = scan_with_grads(cast(inputs, torch.float64), seq_idx, case, "ref", cot)
    assert got["y"].dtype == dtype and got["final_state"].dtype == torch.float32
    assert set(got) == set(want)
    for key, ref_val in want.items():
        assert torch.isfinite(got[key]).all(), f"{key} has NaN/Inf"
        assert got[key].shape == ref_val.shape, key
        name = key[1:] if key.startswith("d") and key[1:] in GRAD_NAMES else None
        if name is not None:
            assert got[key].dtype == inputs[name].dtype, key
        err = rel_err(got[key], ref_val)
        assert err <= TOL[dtype], f"{key}: relative error {err:.2e} > {TOL[dtype]:.0e}"


@pytest.mark.parametrize("case", CASES[1:3] + CASES[5:6], ids=[c.id for c in CASES[1:3] + CASES[5:6]])
def test_ref_float32_matches_float64(case: Case) -> None:
    inputs, seq_idx = make_inputs(case)
    cot = cotangents(case)
    got = scan_with_grads(cast(inputs, torch.float32), seq_idx, case, "ref", cot)
    want = scan_with_grads(inputs, seq_idx, case, "ref", cot)
    for key, ref_val in want.items():
        assert rel_err(got[key], ref_val) <= 1e-5, key


@pytest.mark.parametrize("case", [CASES[1], CASES[5]], ids=[CASES[1].id, CASES[5].id])
def test_chunked_hand_backward_equals_autograd(case: Case) -> None:
    """The custom op's hand-written chunked backward against autograd through the plain torch code."""
    inputs, seq_idx = make_inputs(case)
    dy, dfinal = cotangents(case)
    leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items() if v is not None}
    kw = {k: leaves.get(k) for k in ("D", "z", "dt_bias", "initial_state")}
    args = [leaves[k] for k in ("x", "dt", "A", "B", "C")]
    y, final = ssd_chunked(*args, chunk_size=case.chunk, dt_softplus=case.dt_softplus, seq_idx=seq_idx, **kw)
    auto = dict(zip(leaves, torch.autograd.grad((y, final), list(leaves.values()), (dy, dfinal))))
    hand = ssd_chunked_bwd(
        dy, dfinal, *[inputs[k] for k in ("x", "dt", "A", "B", "C")], chunk_size=case.chunk,
        dt_softplus=case.dt_softplus, seq_idx=seq_idx, **{k: inputs[k] for k in kw},
    )
    for name, g in auto.items():
        assert rel_err(hand[name], g) <= 1e-10, name


@pytest.mark.parametrize("backend", ["ref", "chunked"])
def test_seq_idx_equals_separate_runs(backend: str) -> None:
    case = Case("packed", length=45, seqs=(11, 20, 14), chunk=8)
    inputs, seq_idx = make_inputs(case, seed=3)
    kw = dict(chunk_size=case.chunk, dt_softplus=True, backend=backend, output_final_state=True)
    y, final = ssd_scan(
        inputs["x"], inputs["dt"], inputs["A"], inputs["B"], inputs["C"], D=inputs["D"], z=inputs["z"],
        dt_bias=inputs["dt_bias"], initial_state=inputs["initial_state"], seq_idx=seq_idx, **kw
    )
    pieces, state, start = [], inputs["initial_state"], 0
    for length in case.seqs:
        sl = slice(start, start + length)
        part = {k: inputs[k][:, sl].contiguous() for k in ("x", "dt", "B", "C", "z")}
        y_s, state = ssd_scan(
            part["x"], part["dt"], inputs["A"], part["B"], part["C"], D=inputs["D"], z=part["z"],
            dt_bias=inputs["dt_bias"], initial_state=state if start == 0 else None, **kw
        )
        pieces.append(y_s)
        start += length
    assert rel_err(y, torch.cat(pieces, dim=1)) <= 1e-12
    assert rel_err(final, state) <= 1e-12


@pytest.mark.parametrize("backend", ["ref", "chunked"])
@pytest.mark.parametrize(
    "case",
    [Case("Dhp-z-init-seq", b=1, length=6, h=2, p=2, g=1, n=2, chunk=4, seqs=(2, 4)),
     Case("Dh-G2-nosoftplus", b=2, length=5, h=2, p=1, g=2, n=3, chunk=2, d_shape="H", dt_softplus=False)],
    ids=lambda c: c.id,
)
def test_gradcheck_float64(case: Case, backend: str) -> None:
    inputs, seq_idx = make_inputs(case, seed=5)
    names = [k for k, v in inputs.items() if v is not None]

    def fn(*tensors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = dict(zip(names, tensors))
        return ssd_scan(
            a["x"], a["dt"], a["A"], a["B"], a["C"], chunk_size=case.chunk, D=a.get("D"), z=a.get("z"),
            dt_bias=a.get("dt_bias"), dt_softplus=case.dt_softplus, initial_state=a.get("initial_state"),
            seq_idx=seq_idx, output_final_state=True, backend=backend,
        )

    leaves = tuple(inputs[k].clone().requires_grad_(True) for k in names)
    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7, rtol=1e-5)


def _step_all(inputs: dict[str, torch.Tensor | None], state: torch.Tensor, dt_softplus: bool):
    ys = []
    for t in range(inputs["x"].shape[1]):
        y_t, state = ssd_step(
            state, inputs["x"][:, t], inputs["dt"][:, t], inputs["A"], inputs["B"][:, t], inputs["C"][:, t],
            D=inputs["D"], z=inputs["z"][:, t], dt_bias=inputs["dt_bias"], dt_softplus=dt_softplus,
        )
        ys.append(y_t)
    return torch.stack(ys, dim=1), state


@pytest.mark.parametrize("d_shape", ["HP", "H"])
def test_step_matches_scan(d_shape: str) -> None:
    case = Case("step", length=13, chunk=4, d_shape=d_shape)
    inputs, _ = make_inputs(case, seed=7)
    inputs = cast(inputs, torch.float32)
    y, final = ssd_scan(
        inputs["x"], inputs["dt"], inputs["A"], inputs["B"], inputs["C"], chunk_size=case.chunk, D=inputs["D"],
        z=inputs["z"], dt_bias=inputs["dt_bias"], initial_state=inputs["initial_state"], output_final_state=True,
        backend="chunked",
    )
    y_steps, state = _step_all(inputs, inputs["initial_state"], dt_softplus=True)
    assert y_steps.dtype == torch.float32 and state.shape == final.shape
    assert rel_err(y_steps, y) <= 1e-5
    assert rel_err(state, final) <= 1e-5


@pytest.mark.parametrize("backend", ["ref", "chunked"])
def test_two_halves_chain_equals_one_call(backend: str) -> None:
    case = Case("halves", length=29, chunk=8)
    inputs, _ = make_inputs(case, seed=11)
    inputs = cast(inputs, torch.float32)
    seq = ("x", "dt", "B", "C", "z")

    def call(part: dict[str, torch.Tensor], state: torch.Tensor | None):
        return ssd_scan(
            part["x"], part["dt"], inputs["A"], part["B"], part["C"], chunk_size=case.chunk, D=inputs["D"],
            z=part["z"], dt_bias=inputs["dt_bias"], initial_state=state, output_final_state=True, backend=backend,
        )

    y, final = call({k: inputs[k] for k in seq}, inputs["initial_state"])
    cut = 12
    y1, s1 = call({k: inputs[k][:, :cut].contiguous() for k in seq}, inputs["initial_state"])
    y2, s2 = call({k: inputs[k][:, cut:].contiguous() for k in seq}, s1)
    assert rel_err(torch.cat([y1, y2], dim=1), y) <= 1e-5
    assert rel_err(s2, final) <= 1e-5


def test_final_state_dropped_unless_requested() -> None:
    inputs, _ = make_inputs(Case("plain", length=9, init=False, z=False, d_shape=None))
    y, final = ssd_scan(inputs["x"], inputs["dt"], inputs["A"], inputs["B"], inputs["C"])
    assert final is None and y.shape == inputs["x"].shape


class _TinyMixer(torch.nn.Module):
    """conv1d -> SSD -> gated output, as in a Mamba-2 block (no projections)."""

    def __init__(self, heads: int = 2, headdim: int = 3, width: int = 4) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        d = heads * headdim
        self.heads, self.headdim = heads, headdim
        self.conv_w = torch.nn.Parameter(torch.randn(d, width, generator=gen) * 0.5)
        self.conv_b = torch.nn.Parameter(torch.randn(d, generator=gen) * 0.1)
        self.A_log = torch.nn.Parameter(torch.rand(heads, generator=gen))
        self.D = torch.nn.Parameter(torch.randn(heads, generator=gen))
        self.dt_bias = torch.nn.Parameter(torch.randn(heads, generator=gen) * 0.1)

    def forward(self, x, dt, B, C, z):
        u, _ = causal_conv1d(x, self.conv_w, self.conv_b, activation="silu")
        u = u.reshape(*u.shape[:2], self.heads, self.headdim)
        y, state = ssd_scan(
            u, dt, -torch.exp(self.A_log), B, C, chunk_size=4, D=self.D, z=z, dt_bias=self.dt_bias,
            output_final_state=True,
        )
        return y, state


def test_torch_compile_fullgraph_matches_eager() -> None:
    gen = torch.Generator().manual_seed(2)
    b, L, h, p, n = 2, 11, 2, 3, 4
    x = torch.randn(b, L, h * p, generator=gen, requires_grad=True)
    dt = torch.randn(b, L, h, generator=gen)
    B, C = torch.randn(b, L, 1, n, generator=gen), torch.randn(b, L, 1, n, generator=gen)
    z = torch.randn(b, L, h, p, generator=gen)
    weights = torch.randn(b, L, h, p, generator=gen)
    model = _TinyMixer(h, p)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (model, compiled):
        y, state = fn(x, dt, B, C, z)
        loss = (y * weights).sum() + state.square().sum()
        results.append((y, state, torch.autograd.grad(loss, [x, *model.parameters()])))
    (y0, s0, g0), (y1, s1, g1) = results
    torch.testing.assert_close(y1, y0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(s1, s0, rtol=1e-6, atol=1e-6)
    for a, e in zip(g1, g0):
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-6)


def _valid_kwargs() -> dict:
    inputs, _ = make_inputs(Case("bad", b=2, length=7, h=4, p=3, g=2, n=5))
    return {**cast(inputs, torch.float32), "seq_idx": None}


def _bad(name: str, value) -> dict:
    return {name: value}


BAD_SCAN = [
    ("x-rank-3", lambda k: _bad("x", k["x"][..., 0].contiguous()), r"x must have 4 dims \[B, L, H, P\], got 3"),
    ("dt-length-mismatch", lambda k: _bad("dt", k["dt"][:, :-1].contiguous()), r"dt must have shape .*got \(2, 6, 4\)"),
    ("B-length-mismatch", lambda k: _bad("B", k["B"][:, :-1].contiguous()), r"B must have shape .*got \(2, 6, 2, 5\)"),
    ("C-groups-mismatch", lambda k: _bad("C", k["C"][:, :, :1].contiguous()), r"C must have shape .*got \(2, 7, 1, 5\)"),
    ("H-not-divisible-by-G", lambda k: {"B": torch.zeros(2, 7, 3, 5), "C": torch.zeros(2, 7, 3, 5)},
     r"number of heads H must be divisible by number of groups G, got H=4, G=3"),
    ("fp16-initial-state", lambda k: _bad("initial_state", k["initial_state"].half()),
     r"initial_state must have dtype in \(float32, float64\), got float16"),
    ("non-contiguous-x", lambda k: _bad("x", k["x"].transpose(2, 3).contiguous().transpose(2, 3)),
     r"x must be contiguous"),
    ("D-wrong-rank", lambda k: _bad("D", torch.zeros(4, 3, 1)), r"D must have shape \[H, P\] = \[4, 3\] or \[H\] = \[4\], got"),
    ("D-wrong-size", lambda k: _bad("D", torch.zeros(5)), r"D must have shape \[H\] = \[4\], got \(5,\)"),
    ("A-wrong-size", lambda k: _bad("A", torch.zeros(3)), r"A must have shape \[H\] = \[4\], got \(3,\)"),
    ("seq_idx-float", lambda k: _bad("seq_idx", torch.zeros(2, 7)), r"seq_idx must have dtype in \(int32, int64\), got float32"),
    ("chunk-size-zero", lambda k: _bad("chunk_size", 0), r"chunk_size must be a positive int, got 0"),
    ("bad-backend", lambda k: _bad("backend", "fast"), r"backend must be one of .*got 'fast'"),
    ("dt_softplus-string", lambda k: _bad("dt_softplus", "yes"), r"dt_softplus must be True or False, got 'yes'"),
    ("empty-sequence", lambda k: {n: k[n][:, :0] for n in ("x", "dt", "B", "C", "z")}, r"x must have sequence length L >= 1, got shape"),
]


@pytest.mark.parametrize("mutate,pattern", [c[1:] for c in BAD_SCAN], ids=[c[0] for c in BAD_SCAN])
def test_ssd_scan_rejects_bad_input(mutate, pattern: str) -> None:
    kw = _valid_kwargs()
    kw.update(mutate(kw))
    x, dt, A, B, C = (kw.pop(k) for k in ("x", "dt", "A", "B", "C"))
    with pytest.raises(ValueError, match=r"^ssd_scan: " + pattern):
        ssd_scan(x, dt, A, B, C, **kw)


BAD_STEP = [
    ("state-shape", lambda k: _bad("state", torch.zeros(2, 4, 3, 6)), r"state must have shape .*got \(2, 4, 3, 6\)"),
    ("state-bf16", lambda k: _bad("state", torch.zeros(2, 4, 3, 5, dtype=torch.bfloat16)), r"state must have dtype"),
    ("x-rank-4", lambda k: _bad("x", torch.zeros(2, 1, 4, 3)), r"x must have 3 dims \[B, H, P\], got 4"),
    ("H-not-divisible-by-G", lambda k: {"B": torch.zeros(2, 3, 5), "C": torch.zeros(2, 3, 5)}, r"number of heads H must be divisible by number of groups G, got H=4, G=3"),
    ("z-shape", lambda k: _bad("z", torch.zeros(2, 4, 2)), r"z must have shape .*got \(2, 4, 2\)"),
]


@pytest.mark.parametrize("mutate,pattern", [c[1:] for c in BAD_STEP], ids=[c[0] for c in BAD_STEP])
def test_ssd_step_rejects_bad_input(mutate, pattern: str) -> None:
    full = _valid_kwargs()
    kw = {k: full[k][:, 0].contiguous() for k in ("x", "dt", "B", "C", "z")}
    kw.update(A=full["A"], D=full["D"], dt_bias=full["dt_bias"], state=full["initial_state"])
    kw.update(mutate(kw))
    state, x, dt, A, B, C = (kw.pop(k) for k in ("state", "x", "dt", "A", "B", "C"))
    with pytest.raises(ValueError, match=r"^ssd_step: " + pattern):
        ssd_step(state, x, dt, A, B, C, **kw)


def test_large_decay_long_sequence_is_finite() -> None:
    """dt * |A| up to 50 per step over 4 chunks of 64: the ratio form would overflow here."""
    case = replace(CASES[7], length=256, b=1)
    inputs, _ = make_inputs(case, seed=13)
    inputs = cast(inputs, torch.float32)
    y, final = ssd_scan(
        inputs["x"], inputs["dt"], inputs["A"], inputs["B"], inputs["C"], chunk_size=64, D=inputs["D"],
        z=inputs["z"], dt_softplus=False, initial_state=inputs["initial_state"], output_final_state=True,
    )
    assert torch.isfinite(y).all() and torch.isfinite(final).all()
    # with decay exp(-25..-50) per step, the state is essentially the last input only
    dt, x, B = inputs["dt"][:, -1], inputs["x"][:, -1], inputs["B"][:, -1].repeat_interleave(2, dim=1)
    last = dt[..., None, None] * x[..., None] * B[:, :, None, :]
    assert rel_err(final, last) <= 1e-4
