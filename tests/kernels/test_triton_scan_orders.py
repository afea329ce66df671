"""Triton token movers of the scan orders against the torch path.

This file has two personalities. ``TRITON_INTERPRET`` must be set before triton is imported, so
the interpreter checks run in a child process: :func:`test_interpreter_suite` starts
``pytest <this file>`` with ``TRITON_INTERPRET=1 MZ_SCAN_ORDER_BACKEND=triton`` and fails with
the child's output when the child fails. In that child (``INTERPRETED``) only the interpreter
tests below are defined, on tiny grids; in the parent, the dispatch checks, an ahead-of-time
compile of every kernel for sm_90 (no GPU needed) and the ``gpu`` test at real sizes.
"""
from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from torch import Tensor

from mz_kernels.scan_orders import (
    atrous_merge_2d,
    atrous_scan_2d,
    cross_merge_2d,
    cross_scan_2d,
    local_merge_2d,
    local_scan_2d,
    skip_merge_2d,
    skip_scan_2d,
    spatiotemporal_merge,
    spatiotemporal_scan,
    tri_merge_3d,
    tri_scan_3d,
    window_merge_2d,
    window_scan_2d,
    zigzag_merge_2d,
    zigzag_scan_2d,
)
from mz_kernels.scan_orders import _index, _ops, atrous2d, cross2d, spatiotemporal, tri3d, window2d, zigzag2d

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
LOCAL_DIRS = [(None, False, False), (None, True, True), (2, False, False), (3, True, True)]
CROSS_CODES = {"cross4": (0, 1, 2, 3), "bi": (0, 2), "uni": (0,)}  # row, column, row reversed, column reversed


class Case(NamedTuple):
    """A scan/merge pair, the order it uses and the raster plan ``(rows, cols, codes)`` it should get."""

    name: str
    L: int
    scan: Callable[[Tensor], Tensor]
    merge: Callable[[Tensor], Tensor]
    order: Callable[[torch.device], _index.ScanIndex]
    plan: tuple | None


def cross(H: int, W: int, mode: str) -> Case:
    plan = (H, W, CROSS_CODES[mode]) if mode == "cross4" else (1, H * W, CROSS_CODES[mode])
    return Case(f"cross-{mode}-{H}x{W}", H * W, lambda x: cross_scan_2d(x, H, W, mode),
                lambda y: cross_merge_2d(y, H, W, mode),
                lambda dev: _index.cached(cross2d._build, H, W, mode, device=dev), plan)


def tri(D: int, H: int, W: int) -> Case:
    return Case(f"tri-{D}x{H}x{W}", D * H * W, lambda x: tri_scan_3d(x, D, H, W), lambda y: tri_merge_3d(y, D, H, W),
                lambda dev: _index.cached(tri3d._build, D, H, W, device=dev), (D, H * W, (0, 2, 1)))


def video(T: int, H: int, W: int) -> Case:
    return Case(f"video-temporal-{T}x{H}x{W}", T * H * W,
                lambda x: spatiotemporal_scan(x, T, H, W, order="temporal_first"),
                lambda y: spatiotemporal_merge(y, T, H, W, order="temporal_first"),
                lambda dev: _index.cached(spatiotemporal._build, T, H, W, device=dev), (T, H * W, (1,)))


def window(H: int, W: int, w: int, flip: bool) -> Case:
    dirs = ((w, False, flip),)
    return Case(f"window-w{w}-fl{int(flip)}-{H}x{W}", H * W, lambda x: window_scan_2d(x, H, W, w, flip=flip),
                lambda y: window_merge_2d(y, H, W, w, flip=flip),
                lambda dev: _index.cached(window2d._build, H, W, dirs, device=dev), None)


def local(H: int, W: int) -> Case:
    dirs = tuple(LOCAL_DIRS)
    return Case(f"local-{H}x{W}", H * W, lambda x: local_scan_2d(x, H, W, dirs), lambda y: local_merge_2d(y, H, W, dirs),
                lambda dev: _index.cached(window2d._build, H, W, dirs, device=dev), None)


def skip(H: int, W: int, s: int) -> Case:
    return Case(f"skip-s{s}-{H}x{W}", H * W, lambda x: skip_scan_2d(x, H, W, s), lambda y: skip_merge_2d(y, H, W, s),
                lambda dev: _index.cached(atrous2d._build_skip, H, W, s, device=dev), None)


def zigzag(H: int, W: int) -> Case:
    return Case(f"zigzag-r4-{H}x{W}", H * W, lambda x: zigzag_scan_2d(x, H, W), lambda y: zigzag_merge_2d(y, H, W),
                lambda dev: _index.cached(zigzag2d._build, H, W, 4, device=dev), None)


def atrous(H: int, W: int, r: int) -> Case:
    return Case(f"atrous-r{r}-{H}x{W}", H * W, lambda x: atrous_scan_2d(x, H, W, r),
                lambda y: atrous_merge_2d(y, H, W, r),
                lambda dev: _index.cached(atrous2d._build_atrous, H, W, r, device=dev), None)


@contextlib.contextmanager
def token_backend(name: str) -> Iterator[None]:
    """Run the movers with ``MZ_SCAN_ORDER_BACKEND=name`` inside the block."""
    old = os.environ.get(_ops.BACKEND_ENV)
    os.environ[_ops.BACKEND_ENV] = name
    try:
        yield
    finally:
        if old is None:
            del os.environ[_ops.BACKEND_ENV]
        else:
            os.environ[_ops.BACKEND_ENV] = old


def check_matches_torch(case: Case, *, B: int, C: int, dtype: torch.dtype, device: str, seed: int) -> None:
    """Scan equal bit for bit, merge equal up to float32 summation order, output dtype kept."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, case.L, C, generator=gen).to(device, dtype)
    assert _ops.token_backend(x) == "triton"
    y = case.scan(x)
    with token_backend("torch"):
        y_ref = case.scan(x)
    assert y.dtype == dtype and torch.equal(y, y_ref)
    g = torch.randn(y.shape, generator=gen).to(device, dtype)
    out = case.merge(g)
    with token_backend("torch"):
        ref = case.merge(g.float()).to(dtype)  # float32 sum, rounded once, as the kernels do
    assert out.dtype == dtype
    torch.testing.assert_close(out, ref)


def check_gradients_match_torch(case: Case, *, B: int, C: int, device: str, seed: int) -> None:
    """Gradients of ``merge(sin(scan(x)) * w)`` w.r.t. x and w (backwards run the other mover)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, case.L, C, generator=gen).to(device).requires_grad_(True)
    w = torch.randn(C, generator=gen).to(device).requires_grad_(True)
    results = []
    for name in ("triton", "torch"):
        with token_backend(name):
            out = case.merge(torch.sin(case.scan(x)) * w)
            cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1)).to(device)
            results.append((out, *torch.autograd.grad(out, (x, w), cot)))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want)


if INTERPRETED:
    # ---------------------------------------------------------------- child: Triton interpreter
    from mz_kernels.scan_orders import triton as triton_kernels

    CASES = [cross(H, W, m) for H, W in ((3, 4), (5, 7)) for m in ("cross4", "bi", "uni")] + [
        tri(2, 3, 4),
        video(3, 2, 5),
        window(5, 7, 3, flip=True),
        window(3, 4, 2, flip=False),
        local(5, 7),
        skip(5, 7, 2),
        zigzag(3, 4),
        atrous(5, 7, 2),
    ]
    IDS = [c.name for c in CASES]
    DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}

    def test_dispatch_sends_float_tokens_to_triton():
        assert _ops.token_backend(torch.zeros(1, 2, 3)) == "triton"
        assert _ops.token_backend(torch.zeros(1, 2, 3, dtype=torch.bfloat16)) == "triton"
        assert _ops.token_backend(torch.zeros(1, 2, 3, dtype=torch.float64)) == "torch"
        with token_backend("torch"):
            assert _ops.token_backend(torch.zeros(1, 2, 3)) == "torch"

    @pytest.mark.parametrize("case", CASES, ids=IDS)
    def test_raster_orders_are_recognised(case: Case):
        plan = triton_kernels.raster_plan(*case.order(torch.device("cpu")))
        assert (None if plan is None else tuple(plan)) == case.plan

    @pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
    @pytest.mark.parametrize("case", CASES, ids=IDS)
    def test_public_ops_match_torch(case: Case, dtype: torch.dtype):
        check_matches_torch(case, B=2, C=6, dtype=dtype, device="cpu", seed=11)

    @pytest.mark.parametrize("case", CASES, ids=IDS)
    def test_gradients_match_torch(case: Case):
        check_gradients_match_torch(case, B=2, C=5, device="cpu", seed=12)

    @pytest.mark.parametrize("case", CASES, ids=IDS)
    def test_small_tiles_analytic_and_table_kernels(case: Case):
        """Tiles of 8 tokens x 4 channels: several programs per axis, masked tails in both."""
        order = case.order(torch.device("cpu"))
        K = order.index.shape[0]
        gen = torch.Generator().manual_seed(13)
        x = torch.randn(3, case.L, 6, generator=gen)
        y = torch.randn(3, order.index.shape[1], K, 6, generator=gen)
        want_y = _ops._gather(x, order.index, order.index_holes)
        want_out = _ops._scatter(y, order.inverse, order.inverse_holes)
        outs = []
        for analytic in (True, False) if case.plan else (False,):
            got_y = triton_kernels.gather(x, *order, analytic=analytic, block_l=8, block_c=4)
            assert torch.equal(got_y, want_y), f"analytic={analytic}"
            outs.append(triton_kernels.scatter(y, *order, analytic=analytic, block_l=8, block_c=4))
            torch.testing.assert_close(outs[-1], want_out)
        if K == 1:
            assert torch.equal(outs[0], want_out)  # a pure permutation: no sum, no rounding
        assert all(torch.equal(o, outs[0]) for o in outs)  # both kernels add k = 0..K-1 in order

    OPCHECK = [c for c in CASES if c.name in ("cross-cross4-3x4", "window-w3-fl1-5x7")]  # analytic; holes

    @pytest.mark.parametrize("case", OPCHECK, ids=[c.name for c in OPCHECK])
    def test_ops_pass_opcheck_on_the_triton_path(case: Case):
        order = case.order(torch.device("cpu"))
        K, Lp = order.index.shape
        x = torch.randn(2, case.L, 3, requires_grad=True)
        y = torch.randn(2, Lp, K, 3, requires_grad=True)
        assert _ops.token_backend(x) == "triton"
        torch.library.opcheck(_ops.gather_tokens_op, (x, *order))
        torch.library.opcheck(_ops.scatter_tokens_op, (y, *order))

    def test_merge_of_cross4_counts_each_direction_once():
        ones = torch.ones(2, 35, 4, 3, dtype=torch.bfloat16)
        assert torch.equal(cross_merge_2d(ones, 5, 7), torch.full((2, 35, 3), 4.0, dtype=torch.bfloat16))
        order = _index.cached(atrous2d._build_skip, 5, 7, 2, device=torch.device("cpu"))
        covered = triton_kernels.scatter(torch.ones(1, 12, 4, 1), *order)  # each token in exactly one direction
        assert torch.equal(covered, torch.ones(1, 35, 1))

else:
    # ---------------------------------------------------------------- parent
    def test_interpreter_suite():
        pytest.importorskip("triton")
        env = dict(os.environ, TRITON_INTERPRET="1", MZ_SCAN_ORDER_BACKEND="triton")
        root = Path(__file__).resolve().parents[2]
        cmd = [sys.executable, "-m", "pytest", str(Path(__file__).resolve()), "-q", "-x", "-p", "no:cacheprovider"]
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"interpreter suite failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        assert re.search(r"\b[1-9]\d* passed\b", proc.stdout), proc.stdout

    def test_auto_keeps_cpu_tokens_on_torch(monkeypatch: pytest.MonkeyPatch):
        monkeypatch.delenv(_ops.BACKEND_ENV, raising=False)
        assert _ops.token_backend(torch.zeros(1, 2, 3)) == "torch"
        monkeypatch.setenv(_ops.BACKEND_ENV, "torch")
        assert _ops.token_backend(torch.zeros(1, 2, 3)) == "torch"

    def test_bad_backend_settings_raise(monkeypatch: pytest.MonkeyPatch):
        x = torch.randn(1, 12, 2)
        monkeypatch.setenv(_ops.BACKEND_ENV, "cuda")
        with pytest.raises(ValueError, match=r"MZ_SCAN_ORDER_BACKEND must be one of \['auto', 'torch', 'triton'\], got 'cuda'"):
            cross_scan_2d(x, 3, 4)
        monkeypatch.setenv(_ops.BACKEND_ENV, "triton")
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        if not torch.cuda.is_available():
            with pytest.raises(ValueError, match=r"MZ_SCAN_ORDER_BACKEND=triton needs"):
                cross_scan_2d(x, 3, 4)
        assert _ops.token_backend(x.double()) == "torch"  # float64 never goes to the kernels

    def test_kernels_compile_for_sm90_with_vector_accesses():
        """Compile every kernel ahead of time for an H100 (no GPU needed) as the JIT would specialise
        it for C = 96 and 16-byte aligned tensors; rows must be read and written as 16-byte vectors."""
        triton = pytest.importorskip("triton")
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        from mz_kernels.scan_orders import triton as tk

        table = {"L": "i32", "Lp": "i32", "C": "i32"}
        raster = {"R": "i32", "S": "i32", "C": "i32"}
        cases = [
            (tk.gather_table_kernel, {"x_ptr": "*fp32", "y_ptr": "*fp32", "index_ptr": "*i64", **table},
             {"K": 4, "HOLES": True, "BL": 64, "BC": 32}),
            (tk.scatter_table_kernel, {"y_ptr": "*bf16", "out_ptr": "*bf16", "inverse_ptr": "*i64", **table},
             {"K": 3, "HOLES": True, "BL": 64, "BC": 32}),
            (tk.raster_scan_kernel, {"x_ptr": "*bf16", "y_ptr": "*bf16", **raster},
             {"K": 4, "CODES": 0b11100100, "BL": 64, "BC": 32}),
            (tk.raster_merge_kernel, {"y_ptr": "*fp16", "out_ptr": "*fp16", **raster},
             {"K": 3, "CODES": 0b011000, "BL": 64, "BC": 32}),
        ]
        for kernel, signature, constants in cases:
            aligned = [n for n in signature if n.endswith("_ptr")] + ["C"]
            attrs = {(kernel.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
            src = ASTSource(kernel, {**signature, **{k: "constexpr" for k in constants}}, constexprs=constants,
                            attrs=attrs)
            compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": tk.NUM_WARPS})
            ptx = compiled.asm["ptx"]
            assert "ld.global.v4" in ptx and "st.global.v4" in ptx, kernel.__name__

    GPU_CASES = [cross(56, 56, m) for m in ("cross4", "bi", "uni")] + [
        tri(8, 28, 28),
        video(8, 14, 14),
        window(56, 56, 5, flip=True),
        local(56, 56),
        skip(56, 56, 3),
        zigzag(56, 56),
        atrous(56, 56, 3),
    ]

    @pytest.mark.gpu
    @pytest.mark.parametrize("case", GPU_CASES, ids=[c.name for c in GPU_CASES])
    def test_cuda_kernels_match_torch_at_real_sizes(case: Case):
        for i, dtype in enumerate((torch.float32, torch.bfloat16, torch.float16)):
            check_matches_torch(case, B=8, C=96, dtype=dtype, device="cuda", seed=20 + i)
        check_gradients_match_torch(case, B=8, C=96, device="cuda", seed=30)
        from mz_kernels.scan_orders import triton as tk

        assert (tk.raster_plan(*case.order(torch.device("cuda"))) is not None) == (case.plan is not None)
