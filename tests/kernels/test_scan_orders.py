"""Scan orders: exact inverses, adjoint merges, hand-written orders, gradients, torch.compile, bad input."""
from __future__ import annotations

import doctest
import importlib
from collections.abc import Callable

import pytest
import torch

from mz_kernels.scan_orders import (
    atrous_merge_2d,
    atrous_scan_2d,
    cross_merge_2d,
    cross_scan_2d,
    flip,
    gather_tokens,
    local_merge_2d,
    local_scan_2d,
    local_scan_length,
    scatter_tokens,
    skip_merge_2d,
    skip_scan_2d,
    spatiotemporal_merge,
    spatiotemporal_scan,
    tri_merge_3d,
    tri_scan_3d,
    window_merge_2d,
    window_scan_2d,
    zigzag_direction_ids,
    zigzag_merge_2d,
    zigzag_scan_2d,
)
from mz_kernels.scan_orders._ops import gather_tokens_op, scatter_tokens_op

GRIDS = [(3, 4), (5, 7), (1, 6), (7, 5), (6, 1)]
VOLUMES = [(2, 3, 4), (3, 5, 2)]
LOCAL_DIRS = [(None, False, False), (None, True, True), (2, False, False), (3, True, True)]


class Op:
    """A scan/merge pair on a grid of L tokens; ``multi``: output [B, L', K, C]; ``covers``: every
    direction visits every token (else each token is visited by exactly one direction)."""

    def __init__(self, name: str, L: int, scan: Callable, merge: Callable, multi: bool, covers: bool = True):
        self.name, self.L, self.scan, self.merge, self.multi, self.covers = name, L, scan, merge, multi, covers


def _ops() -> list[Op]:
    ops = []
    for H, W in GRIDS:
        g = f"{H}x{W}"
        for mode in ("cross4", "bi", "uni"):
            ops.append(Op(f"cross-{mode}-{g}", H * W, lambda x, H=H, W=W, m=mode: cross_scan_2d(x, H, W, m),
                          lambda y, H=H, W=W, m=mode: cross_merge_2d(y, H, W, m), True))
        for r in (4, 8, 3):
            ops.append(Op(f"zigzag-r{r}-{g}", H * W, lambda x, H=H, W=W, r=r: zigzag_scan_2d(x, H, W, routes=r),
                          lambda y, H=H, W=W, r=r: zigzag_merge_2d(y, H, W, routes=r), True))
        for w in (2, 3):
            for cf, fl in ((False, False), (True, True), (False, True)):
                kw = dict(window=w, column_first=cf, flip=fl)
                ops.append(Op(f"window-w{w}-cf{int(cf)}-fl{int(fl)}-{g}", H * W,
                              lambda x, H=H, W=W, kw=kw: window_scan_2d(x, H, W, **kw),
                              lambda y, H=H, W=W, kw=kw: window_merge_2d(y, H, W, **kw), False))
        ops.append(Op(f"local-{g}", H * W, lambda x, H=H, W=W: local_scan_2d(x, H, W, LOCAL_DIRS),
                      lambda y, H=H, W=W: local_merge_2d(y, H, W, LOCAL_DIRS), True))
        for r in (1, 2, 3):
            ops.append(Op(f"atrous-r{r}-{g}", H * W, lambda x, H=H, W=W, r=r: atrous_scan_2d(x, H, W, r),
                          lambda y, H=H, W=W, r=r: atrous_merge_2d(y, H, W, r), False))
            ops.append(Op(f"skip-s{r}-{g}", H * W, lambda x, H=H, W=W, r=r: skip_scan_2d(x, H, W, r),
                          lambda y, H=H, W=W, r=r: skip_merge_2d(y, H, W, r), True, covers=r == 1))
    for D, H, W in VOLUMES:
        v = f"{D}x{H}x{W}"
        ops.append(Op(f"tri-{v}", D * H * W, lambda x, D=D, H=H, W=W: tri_scan_3d(x, D, H, W),
                      lambda y, D=D, H=H, W=W: tri_merge_3d(y, D, H, W), True))
        for order in ("spatial_first", "temporal_first"):
            ops.append(Op(f"video-{order}-{v}", D * H * W,
                          lambda x, D=D, H=H, W=W, o=order: spatiotemporal_scan(x, D, H, W, order=o),
                          lambda y, D=D, H=H, W=W, o=order: spatiotemporal_merge(y, D, H, W, order=o), False))
    ops.append(Op("flip-L11", 11, flip, flip, False))
    return ops


OPS = _ops()


@pytest.mark.parametrize("op", OPS, ids=[o.name for o in OPS])
def test_merge_inverts_scan_exactly(op: Op):
    torch.manual_seed(0)
    x = torch.randn(2, op.L, 5)
    y = op.scan(x)
    if not op.multi:
        assert torch.equal(op.merge(y), x)
        return
    assert y.dim() == 4 and y.is_contiguous()
    if not op.covers:  # each token lives in exactly one direction: the merge alone is the inverse
        assert torch.equal(op.merge(y), x)
        return
    for k in range(y.shape[2]):  # every direction on its own is an exact permutation of the tokens
        only_k = torch.zeros_like(y)
        only_k[:, :, k] = y[:, :, k]
        assert torch.equal(op.merge(only_k), x), f"direction {k}"


@pytest.mark.parametrize("op", OPS, ids=[o.name for o in OPS])
def test_merge_is_adjoint_of_scan(op: Op):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, op.L, 4, generator=gen, dtype=torch.float64)
    sx = op.scan(x)
    y = torch.randn(sx.shape, generator=gen, dtype=torch.float64)
    lhs, rhs = (op.merge(y) * x).sum(), (sx * y).sum()
    torch.testing.assert_close(lhs, rhs, rtol=1e-12, atol=1e-12)


def order_of(scan: Callable, L: int) -> list:
    """The token each scan slot reads (-1 for padding), read off by scanning 1..L."""
    y = scan(torch.arange(1.0, L + 1).view(1, L, 1)).squeeze(0).squeeze(-1).long() - 1
    return y.t().tolist() if y.dim() == 2 else y.tolist()


# 3 x 4 grid, row-major token ids:
#   0  1  2  3
#   4  5  6  7
#   8  9 10 11
def test_cross4_order_by_hand():
    assert order_of(lambda x: cross_scan_2d(x, 3, 4), 12) == [
        [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11],
        [0, 4, 8, 1, 5, 9, 2, 6, 10, 3, 7, 11],
        [11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0],
        [11, 7, 3, 10, 6, 2, 9, 5, 1, 8, 4, 0],
    ]
    assert order_of(lambda x: cross_scan_2d(x, 3, 4, "bi"), 12) == [list(range(12)), list(range(11, -1, -1))]
    assert order_of(lambda x: cross_scan_2d(x, 3, 4, "uni"), 12) == [list(range(12))]


def test_zigzag_routes_and_direction_ids_by_hand():
    # ids: 0 start, 1 right, 2 left, 3 up, 4 down
    assert order_of(lambda x: zigzag_scan_2d(x, 3, 4), 12) == [
        [0, 1, 2, 3, 7, 6, 5, 4, 8, 9, 10, 11],
        [11, 10, 9, 8, 4, 5, 6, 7, 3, 2, 1, 0],
        [0, 4, 8, 9, 5, 1, 2, 6, 10, 11, 7, 3],
        [3, 7, 11, 10, 6, 2, 1, 5, 9, 8, 4, 0],
    ]
    assert zigzag_direction_ids(3, 4).tolist() == [
        [0, 1, 1, 1, 4, 2, 2, 2, 4, 1, 1, 1],
        [0, 2, 2, 2, 3, 1, 1, 1, 3, 2, 2, 2],
        [0, 4, 4, 1, 3, 3, 1, 4, 4, 1, 3, 3],
        [0, 4, 4, 2, 3, 3, 2, 4, 4, 2, 3, 3],
    ]
    routes8 = order_of(lambda x: zigzag_scan_2d(x, 3, 4, routes=8), 12)
    assert routes8[4] == [3, 2, 1, 0, 4, 5, 6, 7, 11, 10, 9, 8]
    assert routes8[6] == [8, 4, 0, 1, 5, 9, 10, 6, 2, 3, 7, 11]


@pytest.mark.parametrize("H,W", GRIDS + [(4, 4), (2, 9)], ids=lambda v: str(v))
def test_zigzag_routes_are_continuous_snakes(H: int, W: int):
    routes = order_of(lambda x: zigzag_scan_2d(x, H, W, routes=8), H * W)
    ids = zigzag_direction_ids(H, W, routes=8)
    step_id = {(0, 1): 1, (0, -1): 2, (-1, 0): 3, (1, 0): 4}
    for k, route in enumerate(routes):
        assert sorted(route) == list(range(H * W))
        assert ids[k, 0] == 0
        for j in range(1, H * W):
            (h0, w0), (h1, w1) = divmod(route[j - 1], W), divmod(route[j], W)
            assert step_id[(h1 - h0, w1 - w0)] == ids[k, j], f"route {k} step {j}"
    # PlainMamba's start corners: route 1 from the bottom row, route 3 from the right column
    assert routes[1][0] == ((H - 1) * W + W - 1 if H % 2 else (H - 1) * W)
    assert routes[3][0] == ((H - 1) * W + W - 1 if W % 2 else W - 1)
    assert len({tuple(r) for r in routes}) == (8 if min(H, W) > 1 else 2)


def test_window_order_by_hand():
    # window 2 pads 3x4 to 4x4; windows raster, tokens raster inside
    assert order_of(lambda x: window_scan_2d(x, 3, 4, 2), 12) == [0, 1, 4, 5, 2, 3, 6, 7, 8, 9, -1, -1, 10, 11, -1, -1]
    assert order_of(lambda x: window_scan_2d(x, 3, 4, 2, column_first=True), 12) == [
        0, 4, 1, 5, 8, -1, 9, -1, 2, 6, 3, 7, 10, -1, 11, -1,
    ]
    assert order_of(lambda x: window_scan_2d(x, 3, 4, 2, flip=True), 12) == [
        -1, -1, 11, 10, -1, -1, 9, 8, 7, 6, 3, 2, 5, 4, 1, 0,
    ]
    # window 3 pads 3x4 to 3x6
    assert order_of(lambda x: window_scan_2d(x, 3, 4, 3), 12) == [
        0, 1, 2, 4, 5, 6, 8, 9, 10, 3, -1, -1, 7, -1, -1, 11, -1, -1,
    ]


def test_local_scan_pads_directions_to_a_common_length():
    dirs = [(None, True, False), (2, False, False), (3, False, True)]
    assert local_scan_length(3, 4, dirs) == 18
    assert order_of(lambda x: local_scan_2d(x, 3, 4, dirs), 12) == [
        [0, 4, 8, 1, 5, 9, 2, 6, 10, 3, 7, 11] + [-1] * 6,
        [0, 1, 4, 5, 2, 3, 6, 7, 8, 9, -1, -1, 10, 11, -1, -1] + [-1] * 2,
        [-1, -1, 11, -1, -1, 7, -1, -1, 3, 10, 9, 8, 6, 5, 4, 2, 1, 0],
    ]


def test_atrous_and_skip_orders_by_hand():
    # rate 2: sub-grids (0,0) (0,1) (1,0) (1,1); the last two have one row only (uneven, unpadded)
    assert order_of(lambda x: atrous_scan_2d(x, 3, 4, 2), 12) == [0, 2, 8, 10, 1, 3, 9, 11, 4, 6, 5, 7]
    assert order_of(lambda x: atrous_scan_2d(x, 3, 4, 3), 12) == [0, 3, 1, 2, 4, 7, 5, 6, 8, 11, 9, 10]
    # stride 2 (EfficientVMamba): k=0 (0,0) rows, k=1 (1,0) columns, k=2 (0,1) rows, k=3 (1,1) columns; padded
    assert order_of(lambda x: skip_scan_2d(x, 3, 4, 2), 12) == [
        [0, 2, 8, 10],
        [4, -1, 6, -1],
        [1, 3, 9, 11],
        [5, -1, 7, -1],
    ]


def test_tri_and_spatiotemporal_orders_by_hand():
    assert order_of(lambda x: tri_scan_3d(x, 2, 3, 4), 24) == [
        list(range(24)),
        list(range(23, -1, -1)),
        [0, 12, 1, 13, 2, 14, 3, 15, 4, 16, 5, 17, 6, 18, 7, 19, 8, 20, 9, 21, 10, 22, 11, 23],
    ]
    # 3 slices of 5x2: inter-slice order interleaves the 3 slices (slice count from the shape)
    assert order_of(lambda x: tri_scan_3d(x, 3, 5, 2), 30)[2][:9] == [0, 10, 20, 1, 11, 21, 2, 12, 22]
    assert order_of(lambda x: spatiotemporal_scan(x, 2, 2, 3, order="temporal_first"), 12) == [
        0, 6, 1, 7, 2, 8, 3, 9, 4, 10, 5, 11,
    ]
    assert order_of(lambda x: spatiotemporal_scan(x, 2, 2, 3), 12) == list(range(12))


def test_flip_varlen_keeps_padding_in_place():
    x = torch.arange(12.0).view(2, 6, 1)
    out = flip(x, lengths=torch.tensor([4, 6]))
    assert out.view(2, 6).tolist() == [[3, 2, 1, 0, 4, 5], [11, 10, 9, 8, 7, 6]]
    assert torch.equal(flip(out, lengths=[4, 6]), x)
    assert flip(x, lengths=[0, 1]).view(2, 6).tolist() == x.view(2, 6).tolist()
    assert torch.equal(flip(x, lengths=[6, 6]), flip(x))


def test_flip_varlen_gradient_is_the_flip():
    x = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 5, 3, dtype=torch.float64)
    (gx,) = torch.autograd.grad(flip(x, lengths=[3, 5]), x, g)
    assert torch.equal(gx, flip(g, lengths=[3, 5]))


def _index_case(kind: str):
    """(x shape, index, inverse, index_holes, inverse_holes) for the raw ops."""
    from mz_kernels.scan_orders import _index, atrous2d, cross2d

    order = {
        "cross4-3x2": lambda: cross2d._build(3, 2, "cross4", device=torch.device("cpu")),
        "skip2-3x3-holes": lambda: atrous2d._build_skip(3, 3, 2, device=torch.device("cpu")),
    }[kind]()
    assert isinstance(order, _index.ScanIndex)
    return order


@pytest.mark.parametrize("kind", ["cross4-3x2", "skip2-3x3-holes"])
def test_gather_and_scatter_gradcheck(kind: str):
    order = _index_case(kind)
    K, Lp = order.index.shape
    L = order.inverse.shape[1]
    torch.manual_seed(2)
    x = torch.randn(2, L, 3, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, Lp, K, 3, dtype=torch.float64, requires_grad=True)
    rest = (order.index, order.inverse, order.index_holes, order.inverse_holes)
    assert torch.autograd.gradcheck(lambda t: gather_tokens_op(t, *rest), (x,))
    assert torch.autograd.gradcheck(lambda t: scatter_tokens_op(t, *rest), (y,))
    assert torch.autograd.gradgradcheck(lambda t: gather_tokens_op(t, *rest), (x,))
    assert torch.autograd.gradgradcheck(lambda t: scatter_tokens_op(t, *rest), (y,))


def test_ops_pass_opcheck():
    order = _index_case("skip2-3x3-holes")
    rest = (order.index, order.inverse, order.index_holes, order.inverse_holes)
    x = torch.randn(2, 9, 3, requires_grad=True)
    y = torch.randn(2, 4, 4, 3, requires_grad=True)
    torch.library.opcheck(gather_tokens_op, (x, *rest))
    torch.library.opcheck(scatter_tokens_op, (y, *rest))


def test_generic_gather_scatter_match_indexing():
    torch.manual_seed(3)
    x = torch.randn(2, 7, 3)
    index = torch.stack([torch.randperm(7), torch.tensor([6, 5, -1, 3, 2, 1, 0])])
    y = gather_tokens(x, index)
    assert y.shape == (2, 7, 2, 3)
    assert torch.equal(y[:, :, 0], x[:, index[0]])
    assert torch.equal(y[:, 2, 1], torch.zeros(2, 3)) and torch.equal(y[:, 0, 1], x[:, 6])
    back = scatter_tokens(y, index, 7)
    expected = x.clone()
    expected[:, [6, 5, 3, 2, 1, 0]] += x[:, [6, 5, 3, 2, 1, 0]]
    assert torch.equal(back, expected)  # token 4 is skipped by direction 1


def _pipeline(scan: Callable, merge: Callable) -> Callable:
    def f(x, w):
        y = scan(x)
        return merge(torch.sin(y) * w)

    return f


COMPILE_CASES = {
    "cross4-5x7": (35, 4, lambda x: cross_scan_2d(x, 5, 7), lambda y: cross_merge_2d(y, 5, 7)),
    "skip2-5x7-padded": (35, 4, lambda x: skip_scan_2d(x, 5, 7), lambda y: skip_merge_2d(y, 5, 7)),
    "window3-5x7-padded": (
        35, None, lambda x: window_scan_2d(x, 5, 7, 3, flip=True), lambda y: window_merge_2d(y, 5, 7, 3, flip=True)
    ),
    "local-5x7": (35, 4, lambda x: local_scan_2d(x, 5, 7, LOCAL_DIRS), lambda y: local_merge_2d(y, 5, 7, LOCAL_DIRS)),
    "atrous3-5x7": (35, None, lambda x: atrous_scan_2d(x, 5, 7, 3), lambda y: atrous_merge_2d(y, 5, 7, 3)),
    "tri-3x5x2": (30, 3, lambda x: tri_scan_3d(x, 3, 5, 2), lambda y: tri_merge_3d(y, 3, 5, 2)),
    "video-temporal-3x5x2": (
        30, None,
        lambda x: spatiotemporal_scan(x, 3, 5, 2, order="temporal_first"),
        lambda y: spatiotemporal_merge(y, 3, 5, 2, order="temporal_first"),
    ),
    "flip-varlen": (9, None, lambda x: flip(x, lengths=torch.tensor([9, 4])), lambda y: flip(y, lengths=torch.tensor([9, 4]))),
}


@pytest.mark.parametrize("case", list(COMPILE_CASES), ids=list(COMPILE_CASES))
def test_compiled_matches_eager(case: str):
    torch._dynamo.reset()
    L, K, scan, merge = COMPILE_CASES[case]
    torch.manual_seed(4)
    x = torch.randn(2, L, 6, requires_grad=True)
    w = torch.randn(6, requires_grad=True)
    f = _pipeline(scan, merge)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out_e, out_c = f(x, w), compiled(x, w)
    torch.testing.assert_close(out_c, out_e, rtol=0, atol=0)
    g = torch.randn_like(out_e)
    grads_e = torch.autograd.grad(out_e, (x, w), g)
    grads_c = torch.autograd.grad(out_c, (x, w), g)
    for a, b in zip(grads_c, grads_e):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_compiled_with_symbolic_grid_sizes():
    """dynamic=True turns H and W into symbolic ints: the orders are then built inside the graph."""
    torch._dynamo.reset()

    def f(x, H, W):
        y = cross_merge_2d(cross_scan_2d(x, H, W).cos(), H, W)
        return y + window_merge_2d(window_scan_2d(x, H, W, 2) * 3.0, H, W, 2)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager", dynamic=True)
    torch.manual_seed(7)
    for H, W in [(3, 4), (5, 7), (6, 5)]:
        x = torch.randn(2, H * W, 3)
        torch.testing.assert_close(compiled(x, H, W), f(x, H, W))


def test_compiled_zigzag_with_direction_bias():
    torch._dynamo.reset()

    def f(x, table):
        y = zigzag_scan_2d(x, 3, 5)  # [B, L, K, C]
        ids = zigzag_direction_ids(3, 5, device=x.device)  # [K, L]
        return zigzag_merge_2d(y + table[ids.t()], 3, 5)

    torch.manual_seed(5)
    x = torch.randn(2, 15, 4, requires_grad=True)
    table = torch.randn(5, 4, requires_grad=True)
    out_e = f(x, table)
    out_c = torch.compile(f, fullgraph=True, backend="aot_eager")(x, table)
    torch.testing.assert_close(out_c, out_e)
    ge = torch.autograd.grad(out_e.sum(), (x, table))
    gc = torch.autograd.grad(out_c.sum(), (x, table))
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b)


def test_orders_are_cached_per_shape():
    a = zigzag_direction_ids(4, 6)
    assert zigzag_direction_ids(4, 6) is a
    assert zigzag_direction_ids(6, 4) is not a


def test_first_use_under_inference_mode_still_trains():
    with torch.inference_mode():
        cross_scan_2d(torch.randn(1, 11 * 13, 2), 11, 13)  # builds and caches the 11x13 order
    x = torch.randn(1, 11 * 13, 2, requires_grad=True)
    cross_merge_2d(cross_scan_2d(x, 11, 13), 11, 13).sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, 4.0))


BAD = {
    "L-mismatch": (lambda: cross_scan_2d(torch.randn(2, 13, 4), 3, 4), r"x must have L = H\*W = 3\*4 = 12 tokens, got L = 13"),
    "rank": (lambda: zigzag_scan_2d(torch.randn(12, 4), 3, 4), r"x must have 3 dims \[B, L, C\], got 2 dims"),
    "not-tensor": (lambda: tri_scan_3d([1, 2], 1, 1, 2), r"x must be a torch.Tensor"),
    "mode": (lambda: cross_scan_2d(torch.randn(1, 12, 2), 3, 4, "cross2d"), r"mode must be one of \['cross4', 'bi', 'uni'\], got 'cross2d'"),
    "merge-K": (lambda: cross_merge_2d(torch.randn(1, 12, 2, 3), 3, 4), r"y must have shape \[B, L', K, C\] = \[\*, 12, 4, \*\]"),
    "H-zero": (lambda: cross_scan_2d(torch.randn(1, 0, 2), 0, 4), r"H must be an int >= 1, got 0"),
    "W-float": (lambda: window_scan_2d(torch.randn(1, 12, 2), 3, 4.0, 2), r"W must be an int >= 1, got 4.0"),
    "window-zero": (lambda: window_scan_2d(torch.randn(1, 12, 2), 3, 4, 0), r"window must be an int >= 1, got 0"),
    "window-merge-L": (lambda: window_merge_2d(torch.randn(1, 12, 2), 3, 4, 2), r"y must have L = ceil\(H/w\)\*w \* ceil\(W/w\)\*w .* = 16 tokens, got L = 12"),
    "column_first-type": (lambda: window_scan_2d(torch.randn(1, 12, 2), 3, 4, 2, column_first="yes"), r"column_first must be a bool"),
    "rate-negative": (lambda: atrous_scan_2d(torch.randn(1, 12, 2), 3, 4, -1), r"rate must be an int >= 1, got -1"),
    "stride-zero": (lambda: skip_scan_2d(torch.randn(1, 12, 2), 3, 4, 0), r"stride must be an int >= 1, got 0"),
    "routes": (lambda: zigzag_scan_2d(torch.randn(1, 12, 2), 3, 4, routes=9), r"routes must be an int in \[1, 8\].*got 9"),
    "order": (lambda: spatiotemporal_scan(torch.randn(1, 12, 2), 2, 2, 3, order="thw"), r"order must be one of \['spatial_first', 'temporal_first'\], got 'thw'"),
    "tri-L": (lambda: tri_scan_3d(torch.randn(1, 23, 2), 2, 3, 4), r"x must have L = D\*H\*W = 2\*3\*4 = 24 tokens, got L = 23"),
    "local-empty": (lambda: local_scan_2d(torch.randn(1, 12, 2), 3, 4, []), r"directions must be a non-empty sequence"),
    "local-window": (lambda: local_scan_2d(torch.randn(1, 12, 2), 3, 4, [(0, False, False)]), r"directions\[0\] window must be an int >= 1 or None"),
    "flip-lengths-shape": (lambda: flip(torch.randn(2, 5, 1), lengths=torch.tensor([3])), r"lengths must be an integer tensor of shape \[B\] = \[2\]"),
    "flip-lengths-range": (lambda: flip(torch.randn(2, 5, 1), lengths=[3, 6]), r"lengths must lie in \[0, L\] = \[0, 5\], got values in \[3, 6\]"),
    "gather-duplicate": (lambda: gather_tokens(torch.randn(1, 4, 2), torch.tensor([[0, 1, 1, 3]])), r"visits token 1 2 times"),
    "gather-range": (lambda: gather_tokens(torch.randn(1, 4, 2), torch.tensor([[0, 4]])), r"index values must lie in \[-1, L - 1\] = \[-1, 3\], got \[0, 4\]"),
    "scatter-shape": (lambda: scatter_tokens(torch.randn(1, 4, 2, 3), torch.tensor([[0, 1, 2, 3]]), 4), r"index must have shape \[K, L'\] = \[2, 4\]"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_input_raises_value_error(case: str):
    fn, match = BAD[case]
    with pytest.raises(ValueError, match=match):
        fn()


DOC_MODULES = ["orders1d", "tokens", "cross2d", "zigzag2d", "window2d", "atrous2d", "tri3d", "spatiotemporal"]


@pytest.mark.parametrize("name", DOC_MODULES, ids=DOC_MODULES)
def test_docstring_examples_run(name: str):
    module = importlib.import_module(f"mz_kernels.scan_orders.{name}")
    result = doctest.testmod(module, extraglobs={"torch": torch}, verbose=False)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.gpu
def test_cuda_matches_cpu():
    torch.manual_seed(6)
    x = torch.randn(2, 5 * 7, 3)
    xc = x.cuda().requires_grad_(True)
    for scan, merge in [
        (lambda t: cross_scan_2d(t, 5, 7), lambda t: cross_merge_2d(t, 5, 7)),
        (lambda t: skip_scan_2d(t, 5, 7, 3), lambda t: skip_merge_2d(t, 5, 7, 3)),
        (lambda t: local_scan_2d(t, 5, 7, LOCAL_DIRS), lambda t: local_merge_2d(t, 5, 7, LOCAL_DIRS)),
    ]:
        y = scan(xc)
        assert torch.equal(y.cpu(), scan(x))
        assert torch.equal(merge(y).cpu(), merge(scan(x)))
        (g,) = torch.autograd.grad(merge(y).sum(), xc)
        assert torch.equal(g.cpu(), merge(scan(torch.ones_like(x))))
