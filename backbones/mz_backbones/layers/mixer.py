"""The Mamba mixer over K scan directions of one token grid (Vim v2, SegMamba ToM, LocalVim, the 1D
sequence encoder): shared ``in_proj`` -> scan into K sequences -> per-direction causal depthwise conv1d
-> SiLU -> :class:`SelectiveSSM` (K directions in one scan call) -> merge -> ``* SiLU(z)`` -> ``out_proj``.
"""
from __future__ import annotations

from collections.abc import Sequence

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
    ):
        super().__init__()
        if merge not in MERGES:
            raise ValueError(f"MambaMixer: merge must be one of {list(MERGES)}, got {merge!r}")
        self.scan, self.merge, self.gate = scan, merge, gate
        self.d_inner = int(expand * dim)
        K = scan.num_dirs
        kp = 1 if share_params else K
        self.share_params = share_params
        self.in_proj = nn.Linear(dim, self.d_inner * (2 if gate else 1), bias=bias)
        self.conv_weight = nn.Parameter(torch_empty_uniform(kp * self.d_inner, d_conv, bound=d_conv**-0.5))
        self.conv_bias = nn.Parameter(torch_empty_uniform(kp * self.d_inner, bound=d_conv**-0.5)) if conv_bias else None
        self.ssm = SelectiveSSM(self.d_inner, d_state, K, dt_rank=dt_rank, dt_rank_base=dim, share_params=share_params)
        self.out_proj = nn.Linear(self.d_inner, dim, bias=bias)

    def forward(self, x: Tensor, grid: Sequence[int]) -> Tensor:
        """``x [B, L, dim]`` tokens of ``grid`` (prod(grid) == L) -> ``[B, L, dim]``."""
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


def torch_empty_uniform(*shape: int, bound: float):
    import torch

    return torch.empty(*shape).uniform_(-bound, bound)
