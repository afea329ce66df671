"""The Mamba mixer over K scan directions of one token grid (Vim v2, SegMamba ToM, LocalVim, the 1D
sequence encoder): shared ``in_proj`` -> scan into K sequences -> per-direction causal depthwise conv1d
-> SiLU -> :class:`SelectiveSSM` (K directions in one scan call) -> merge -> ``* SiLU(z)`` -> ``out_proj``.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from mz_kernels import causal_conv1d

from .scans import ScanStrategy
from .ssm import SelectiveSSM

MERGES = ("sum", "mean")
RECOMPUTES = ("core", "none")


class MambaMixer(nn.Module):
    """Token mixer ``[B, L, dim] -> [B, L, dim]``.

    Args:
        dim: model width.
        scan: the scan strategy (its ``num_dirs`` directions get their own conv/x_proj/dt_proj/A/D
            unless ``share_params``).
        d_state, expand, d_conv, dt_rank: Mamba hyper-parameters (d_inner = expand * dim).
        merge: ``"mean"`` (Vim's divide-by-K, avoids the summed-direction NaNs) or ``"sum"``.
        share_params: one set of conv/SSM parameters for all directions (nnMamba style).
        gate: multiply by SiLU(z) (z from in_proj).
        stream_chunk: without autograd (inference), sequences longer than this many tokens run in
            pieces of this size when the scan's directions are raster/reversed (``scan.stream_dirs``):
            conv and SSM states carry across pieces, so the result equals the whole-sequence path,
            while the per-layer temporaries shrink from ~10 ``[B, L, d_inner]`` tensors to one
            ``[B, L, d_inner]`` accumulator for the reversed direction plus piece-sized buffers
            (``in_proj``'s ``x`` half runs twice: 1.5x its FLOPs, far less memory traffic). The
            default of 512 tokens keeps each piece buffer (~0.8 MB at d_inner 384) cache-sized and
            the piece buffers together below the ``[B, L, dim]`` stream at long sequences (Vim-T at
            1248^2: 18.3 MiB peak with 512-token pieces, 21.4 with 1024, same speed within noise).
            ``0`` always runs the whole sequence.
        recompute: what autograd keeps of the core (scan order -> conv -> SSM -> merge -> gate, the
            part between ``in_proj`` and ``out_proj``) when gradients are tracked. ``"core"``
            (default) keeps only its input (the ``in_proj`` output) and recomputes the rest in the
            backward pass, as mamba_ssm's fused ``mamba_inner_fn`` does for conv and delta; ``"none"``
            keeps every intermediate. The core is cheap next to the projections and the scan's
            backward, while a three-direction layer holds 3.0 instead of 17.9 ``[B, L, d_inner]``
            tensors between forward and backward (tests/backbones/test_mixer_recompute.py). With
            ``"core"`` a SegMamba-full training step (MONAI decoder blocks) at 128^3 peaks at 11131
            instead of 14591 MiB (64^3: 1168 instead of 1602; CPU, fp32), in 107.8 s against 103.8 s
            (one call each).
    """

    def __init__(
        self,
        dim: int,
        scan: ScanStrategy,
        *,
        d_state: int = 16,
        expand: float = 2.0,
        d_conv: int = 4,
        dt_rank: int | str = "auto",
        merge: str = "mean",
        share_params: bool = False,
        gate: bool = True,
        bias: bool = False,
        conv_bias: bool = True,
        stream_chunk: int = 512,
        recompute: str = "core",
    ):
        super().__init__()
        if recompute not in RECOMPUTES:
            raise ValueError(f"MambaMixer: recompute must be one of {list(RECOMPUTES)}, got {recompute!r}")
        self.recompute = recompute
        if merge not in MERGES:
            raise ValueError(f"MambaMixer: merge must be one of {list(MERGES)}, got {merge!r}")
        if isinstance(stream_chunk, bool) or not isinstance(stream_chunk, int) or stream_chunk < 0:
            raise ValueError(f"MambaMixer: stream_chunk must be an int >= 0, got {stream_chunk!r}")
        self.scan, self.merge, self.gate = scan, merge, gate
        self.stream_chunk = stream_chunk
        self.d_inner = int(expand * dim)
        K = scan.num_dirs
        kp = 1 if share_params else K
        self.share_params = share_params
        self.in_proj = nn.Linear(dim, self.d_inner * (2 if gate else 1), bias=bias)
        self.conv_weight = nn.Parameter(torch_empty_uniform(kp * self.d_inner, d_conv, bound=d_conv**-0.5))
        self.conv_bias = nn.Parameter(torch_empty_uniform(kp * self.d_inner, bound=d_conv**-0.5)) if conv_bias else None
        self.ssm = SelectiveSSM(self.d_inner, d_state, K, dt_rank=dt_rank, dt_rank_base=dim, share_params=share_params)
        self.out_proj = nn.Linear(self.d_inner, dim, bias=bias)

    def forward(self, x: Tensor, grid: Sequence[int], pre: Callable[[Tensor], Tensor] | None = None) -> Tensor:
        """``x [B, L, dim]`` tokens of ``grid`` (prod(grid) == L) -> ``[B, L, dim]``.

        ``pre`` (e.g. the block's norm) is applied to ``x`` first: per piece when streaming, so the
        normalised copy of the whole sequence is never built.
        """
        if self._streams(x):
            self.scan._check(grid, x)
            return self._forward_streaming(x, pre)
        if pre is not None:
            x = pre(x)
        xz = self.in_proj(x)
        if self.recompute == "core" and self._tracks_grad(xz):
            out = torch.utils.checkpoint.checkpoint(self._core, xz, tuple(grid), use_reentrant=False, preserve_rng_state=False)
        else:
            out = self._core(xz, grid)
        return self.out_proj(out)

    def _core(self, xz: Tensor, grid: Sequence[int]) -> Tensor:
        """``in_proj`` output ``[B, L, (2 if gate else 1) * d_inner]`` -> the merged, gated SSM output
        ``[B, L, d_inner]`` (the input of ``out_proj``)."""
        B, L, _ = xz.shape
        K, C = self.scan.num_dirs, self.d_inner
        xs, z = (xz.chunk(2, dim=-1) if self.gate else (xz, None))
        seq = self.scan.scan(xs.contiguous(), grid)  # [B, L', K, C]
        Lp = seq.shape[1]
        w = self.conv_weight if not self.share_params else self.conv_weight.repeat(K, 1)
        b = self.conv_bias if (self.conv_bias is None or not self.share_params) else self.conv_bias.repeat(K)
        conv, _ = causal_conv1d(seq.reshape(B, Lp, K * C), w.to(seq.dtype), None if b is None else b.to(seq.dtype), activation="silu")
        y = self.ssm(conv.reshape(B, Lp, K, C))
        out = self.scan.merge(y, grid)
        if self.merge == "mean":
            out = out / K
        if z is not None:
            out = out * F.silu(z)
        return out

    def _tracks_grad(self, x: Tensor) -> bool:
        """Whether autograd records this call (grad mode on, and ``x`` or a parameter needs grad)."""
        return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters()))


    def _streams(self, x: Tensor) -> bool:
        return (
            self.stream_chunk > 0
            and x.shape[1] > self.stream_chunk
            and self.scan.stream_dirs is not None
            and not self._tracks_grad(x)
        )

    def _conv_params(self, k: int) -> tuple[Tensor, Tensor | None]:
        C = self.d_inner
        kk = 0 if self.share_params else k
        w = self.conv_weight[kk * C : (kk + 1) * C]
        b = None if self.conv_bias is None else self.conv_bias[kk * C : (kk + 1) * C]
        return w, b

    @torch.no_grad()
    def add_into(self, stream: Tensor, grid: Sequence[int], pre: Callable[[Tensor], Tensor] | None = None) -> Tensor:
        """``stream += self(stream, grid, pre)`` in place, without autograd; returns ``stream``.

        When the mixer streams, each piece's output is added into ``stream`` as soon as it is done
        (the forward pass reads piece ``[s:e]`` of ``stream`` before writing it, and nothing reads it
        later), so no ``[B, L, dim]`` output buffer exists. A residual block uses this to update its
        stream in place (Vim's "Add -> Norm -> Mixer" loop).
        """
        if self._streams(stream):
            self.scan._check(grid, stream)
            return self._forward_streaming(stream, pre, into=stream)
        return stream.add_(self.forward(stream, grid, pre))

    def _pieces(self, L: int) -> list[tuple[int, int]]:
        n = -(-L // self.stream_chunk)
        bounds = [round(i * L / n) for i in range(n + 1)]  # n near-equal pieces
        return list(zip(bounds[:-1], bounds[1:]))

    @torch.no_grad()
    def _forward_streaming(
        self, x: Tensor, pre: Callable[[Tensor], Tensor] | None = None, into: Tensor | None = None
    ) -> Tensor:
        """Inference in pieces of at most ``stream_chunk`` tokens (see the class docstring); same
        result as the whole-sequence path up to float rounding.

        Two passes. Pass 1 runs the reversed directions over the pieces from last to first (only the
        ``x`` half of ``in_proj``: the gate ``z`` is the same for every direction) and keeps their
        ungated outputs in one ``[B, L, d_inner]`` accumulator. Pass 2 runs the raster directions over
        the pieces in order: ``in_proj`` (both halves), conv and scan with carried states, adds the
        accumulator's piece, gates, and applies ``out_proj`` (the mean's 1/K folded into its weight)
        once per piece. ``in_proj`` thus costs 1.5x and ``out_proj`` 1x the whole-sequence path.
        The result goes into a new ``[B, L, dim]`` tensor, or is added into ``into`` (which may be
        ``x`` itself: pass 2 reads piece ``[s:e]`` of ``x`` before writing it).
        """
        B, L, _ = x.shape
        C, dirs = self.d_inner, self.scan.stream_dirs
        pieces = self._pieces(L)
        w_in, b_in = self.in_proj.weight, self.in_proj.bias
        wx, bx = w_in[:C], None if b_in is None else b_in[:C]
        wz, bz = w_in[C:], None if b_in is None else b_in[C:]
        w_out = self.out_proj.weight / len(dirs) if self.merge == "mean" else self.out_proj.weight

        def tokens(s: int, e: int) -> Tensor:
            return x[:, s:e] if pre is None else pre(x[:, s:e])

        def convs(ks: list[int], xs: Tensor) -> list[Tensor]:  # each direction's conv, state carried
            out = []
            for k in ks:
                w, b = self._conv_params(k)
                conv, states[k][0] = causal_conv1d(
                    xs, w.to(xs.dtype), None if b is None else b.to(xs.dtype),
                    activation="silu", initial_state=states[k][0], output_final_state=True,
                )
                out.append(conv)
            return out

        def scan(k: int, conv: Tensor, z: Tensor | None = None) -> Tensor:  # SSM state carried
            y, states[k][1] = self.ssm.forward_dir(conv, k, states[k][1], z=z)
            return y

        rev = [k for k, how in enumerate(dirs) if how == "rev"]
        fwd = [k for k, how in enumerate(dirs) if how == "fwd"]
        states: dict[int, list] = {k: [None, None] for k in range(len(dirs))}  # conv, ssm state
        acc: Tensor | None = None
        # Buffers are dropped as soon as they are used (``del``, ``pop``): the peak of a piece is
        # about four [B, piece, d_inner] tensors.
        for s, e in pieces[::-1] if rev else ():  # pass 1: reversed directions, last piece first
            cs = convs(rev, F.linear(tokens(s, e).flip(1), wx, bx))  # flip the narrower input
            for k in rev:
                y = scan(k, cs.pop(0))
                if acc is None:
                    acc = y.new_empty(B, L, C)
                if k == rev[0]:
                    torch.ops.aten.flip.out(y, [1], out=acc[:, s:e])  # no flipped temporary
                else:
                    acc[:, s:e] += y.flip(1)
                del y
        fuse_gate = self.gate and acc is None and len(fwd) == 1  # the scan applies silu(z) itself
        bias = self.out_proj.bias
        out = into
        for s, e in pieces:  # pass 2: raster directions in order, then gate and out_proj per piece
            h = tokens(s, e)
            z = F.linear(h, wz, bz) if self.gate else None
            cs = convs(fwd, F.linear(h, wx, bx))
            del h
            y_sum = None if acc is None else acc[:, s:e]
            for k in fwd:
                y = scan(k, cs.pop(0), z=z if fuse_gate else None)
                y_sum = y if y_sum is None else y.add_(y_sum)
                del y
            assert y_sum is not None
            if z is not None and not fuse_gate:
                y_sum = y_sum.mul_(F.silu(z, inplace=True))  # y_sum is this piece's own tensor
            piece = F.linear(y_sum, w_out.to(y_sum.dtype), None if bias is None else bias.to(y_sum.dtype))
            del y_sum, z
            if out is None:
                out = piece.new_empty(B, L, piece.shape[-1])
            if out is into:
                out[:, s:e] += piece
            else:
                out[:, s:e] = piece
            del piece
        assert out is not None
        return out


def torch_empty_uniform(*shape: int, bound: float) -> Tensor:
    return torch.empty(*shape).uniform_(-bound, bound)
