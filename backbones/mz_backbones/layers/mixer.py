"""The Mamba mixer over K scan directions of one token grid (Vim v2, SegMamba ToM, LocalVim, the 1D
sequence encoder): shared ``in_proj`` -> scan into K sequences -> per-direction causal depthwise conv1d
-> SiLU -> :class:`SelectiveSSM` (K directions in one scan call) -> merge -> ``* SiLU(z)`` -> ``out_proj``.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mz_kernels import causal_conv1d

from .scans import ScanStrategy
from .ssm import SelectiveSSM

MERGES = ("sum", "mean")


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
            while the per-layer temporaries shrink from ~10 ``[B, L, d_inner]`` tensors to the
            ``[B, L, dim]`` output plus piece-sized buffers (``in_proj`` and ``out_proj`` run once per
            direction: more FLOPs, far less memory traffic). ``0`` always runs the whole sequence.
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
        stream_chunk: int = 1024,
    ):
        super().__init__()
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
        B, L, _ = x.shape
        K, C = self.scan.num_dirs, self.d_inner
        xz = self.in_proj(x)
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
        return self.out_proj(out)


    def _streams(self, x: Tensor) -> bool:
        return (
            self.stream_chunk > 0
            and x.shape[1] > self.stream_chunk
            and self.scan.stream_dirs is not None
            and not (torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters())))
        )

    def _conv_params(self, k: int) -> tuple[Tensor, Tensor | None]:
        C = self.d_inner
        kk = 0 if self.share_params else k
        w = self.conv_weight[kk * C : (kk + 1) * C]
        b = None if self.conv_bias is None else self.conv_bias[kk * C : (kk + 1) * C]
        return w, b

    @torch.no_grad()
    def _forward_streaming(self, x: Tensor, pre: Callable[[Tensor], Tensor] | None = None) -> Tensor:
        """Inference in pieces of at most ``stream_chunk`` tokens (see the class docstring); same
        result as the whole-sequence path up to float rounding.

        ``out_proj`` is linear, so each direction's gated output (the gate fused into the scan) is
        projected and added into ``out [B, L, dim]`` as soon as its piece is done, with the mean's
        1/K folded into the projection weight; nothing of size ``[B, L, d_inner]`` is kept.
        """
        B, L, _ = x.shape
        C, dirs = self.d_inner, self.scan.stream_dirs
        n = -(-L // self.stream_chunk)
        bounds = [round(i * L / n) for i in range(n + 1)]  # n near-equal pieces
        pieces = list(zip(bounds[:-1], bounds[1:]))
        weight = self.out_proj.weight / len(dirs) if self.merge == "mean" else self.out_proj.weight
        out: Tensor | None = None
        for k, how in enumerate(dirs):
            w, b = self._conv_params(k)
            conv_state = ssm_state = None
            for s, e in pieces if how == "fwd" else pieces[::-1]:
                xz = self.in_proj(x[:, s:e] if pre is None else pre(x[:, s:e]))
                xs, z = (xz[..., :C], xz[..., C:]) if self.gate else (xz, None)
                if how == "rev":
                    xs, z = xs.flip(1), None if z is None else z.flip(1)
                conv, conv_state = causal_conv1d(
                    xs.contiguous(), w.to(xs.dtype), None if b is None else b.to(xs.dtype),
                    activation="silu", initial_state=conv_state, output_final_state=True,
                )
                del xs, xz
                y, ssm_state = self.ssm.forward_dir(conv, k, ssm_state, z=z)
                del conv, z
                if how == "rev":
                    y = y.flip(1)
                piece = F.linear(y, weight.to(y.dtype))  # the bias is added once, below
                if out is None:
                    out = piece.new_zeros(B, L, piece.shape[-1])
                out[:, s:e] += piece
        assert out is not None
        if self.out_proj.bias is not None:
            out += self.out_proj.bias
        return out


def torch_empty_uniform(*shape: int, bound: float) -> Tensor:
    return torch.empty(*shape).uniform_(-bound, bound)
