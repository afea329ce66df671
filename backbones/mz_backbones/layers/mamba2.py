"""Mamba-2 (SSD) token mixer on :func:`mz_kernels.ssd_scan`, usable by any family.

``in_proj`` (d -> [z, x, B, C, dt]) -> causal depthwise conv1d + SiLU over ``[x, B, C]`` -> SSD scan
with ``nheads`` heads of ``headdim`` channels and ``ngroups`` B/C groups -> gated RMSNorm
(``RMSNorm(y * SiLU(z))`` per group, mamba_ssm's ``norm_before_gate=False``) -> ``out_proj``.
The scan runs in float32 also under autocast.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mz_kernels import causal_conv1d, ssd_scan
from mz_kernels._validate import check_positive_int


class GatedRMSNorm(nn.Module):
    """``RMSNorm(y * SiLU(z)) * weight`` over groups of ``dim // groups`` channels (last dim)."""

    def __init__(self, dim: int, groups: int = 1, eps: float = 1e-5):
        super().__init__()
        if dim % groups:
            raise ValueError(f"GatedRMSNorm: dim must be divisible by groups, got dim={dim}, groups={groups}")
        self.groups, self.eps = groups, eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, y: Tensor, z: Tensor | None = None) -> Tensor:
        """``y, z [..., dim]`` -> ``[..., dim]``."""
        dtype = y.dtype
        y = y.float()
        if z is not None:
            y = y * F.silu(z.float())
        g = y.unflatten(-1, (self.groups, -1))
        g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + self.eps)
        return (g.flatten(-2) * self.weight.float()).to(dtype)


class Mamba2Mixer(nn.Module):
    """Mamba-2 mixer ``[B, L, dim] -> [B, L, dim]`` (causal along L).

    Args:
        dim: model width.
        d_state: state size N per group (Mamba-2 default 128; vision models often use 64).
        expand: d_inner = expand * dim.
        headdim: channels P per head; ``d_inner`` must be a multiple of it (nheads = d_inner / P).
        ngroups: B/C groups G; nheads must be divisible by G.
        d_conv: causal conv1d width.
        chunk_size: SSD chunk length.
        A_init_range, dt_min, dt_max, dt_init_floor: Mamba-2 initialisation.
        bias, conv_bias: biases of the projections / the conv.
        backend: ``ssd_scan`` backend.

    Examples:
        >>> mixer = Mamba2Mixer(64, d_state=16, headdim=16)
        >>> mixer(torch.randn(2, 33, 64)).shape
        torch.Size([2, 33, 64])
    """

    def __init__(
        self,
        dim: int,
        *,
        d_state: int = 64,
        expand: float = 2.0,
        headdim: int = 64,
        ngroups: int = 1,
        d_conv: int = 4,
        chunk_size: int = 64,
        A_init_range: tuple[float, float] = (1.0, 16.0),
        dt_min: float = 1e-3,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        bias: bool = False,
        conv_bias: bool = True,
        backend: str = "auto",
    ):
        super().__init__()
        for name, v in (("dim", dim), ("d_state", d_state), ("headdim", headdim), ("ngroups", ngroups),
                        ("d_conv", d_conv), ("chunk_size", chunk_size)):
            check_positive_int("Mamba2Mixer", name, v)
        self.d_inner = int(expand * dim)
        if self.d_inner % headdim:
            raise ValueError(f"Mamba2Mixer: d_inner = expand * dim = {self.d_inner} must be a multiple of headdim={headdim}")
        self.nheads = self.d_inner // headdim
        if self.nheads % ngroups:
            raise ValueError(f"Mamba2Mixer: nheads = {self.nheads} must be divisible by ngroups={ngroups}")
        if not 0 < A_init_range[0] <= A_init_range[1]:
            raise ValueError(f"Mamba2Mixer: A_init_range must be (lo, hi) with 0 < lo <= hi, got {A_init_range!r}")
        self.d_state, self.headdim, self.ngroups = d_state, headdim, ngroups
        self.chunk_size, self.backend = chunk_size, backend
        self.conv_dim = self.d_inner + 2 * ngroups * d_state
        self.in_proj = nn.Linear(dim, 2 * self.d_inner + 2 * ngroups * d_state + self.nheads, bias=bias)
        bound = d_conv**-0.5
        self.conv_weight = nn.Parameter(torch.empty(self.conv_dim, d_conv).uniform_(-bound, bound))
        self.conv_bias = nn.Parameter(torch.empty(self.conv_dim).uniform_(-bound, bound)) if conv_bias else None
        H = self.nheads
        dt = torch.exp(torch.rand(H) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=dt_init_floor)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        self.A_log = nn.Parameter(torch.log(torch.empty(H).uniform_(*A_init_range)))
        self.D = nn.Parameter(torch.ones(H))
        self.norm = GatedRMSNorm(self.d_inner, groups=ngroups)
        self.out_proj = nn.Linear(self.d_inner, dim, bias=bias)

    def forward(self, x: Tensor, seq_idx: Tensor | None = None) -> Tensor:
        """``x [B, L, dim]`` -> ``[B, L, dim]``; ``seq_idx [B, L]`` (optional) restarts the state
        where the id changes (packed sequences; the conv still reads across the boundary)."""
        if x.dim() != 3 or x.shape[-1] != self.in_proj.in_features:
            raise ValueError(f"Mamba2Mixer: x must be [B, L, {self.in_proj.in_features}], got {tuple(x.shape)}")
        Bsz, L, _ = x.shape
        Di, G, N, H, P = self.d_inner, self.ngroups, self.d_state, self.nheads, self.headdim
        z, xbc, dt = self.in_proj(x).split([Di, self.conv_dim, H], dim=-1)
        bias = None if self.conv_bias is None else self.conv_bias.to(xbc.dtype)
        xbc, _ = causal_conv1d(xbc.contiguous(), self.conv_weight.to(xbc.dtype), bias, activation="silu")
        xs, Bm, Cm = xbc.split([Di, G * N, G * N], dim=-1)
        with torch.autocast(device_type=x.device.type, enabled=False):
            y, _ = ssd_scan(
                xs.float().reshape(Bsz, L, H, P).contiguous(),
                dt.float().contiguous(),
                -torch.exp(self.A_log.float()),
                Bm.float().reshape(Bsz, L, G, N).contiguous(),
                Cm.float().reshape(Bsz, L, G, N).contiguous(),
                chunk_size=self.chunk_size,
                D=self.D.float(),
                dt_bias=self.dt_bias.float(),
                dt_softplus=True,
                seq_idx=seq_idx,
                backend=self.backend,
            )
        y = self.norm(y.reshape(Bsz, L, Di), z.float()).to(x.dtype)
        return self.out_proj(y)
