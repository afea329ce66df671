"""VMamba's SS2D token mixer over a 2D grid, with any 2D scan strategy.

``in_proj`` (d -> d_inner, or 2*d_inner with the z gate) -> depthwise conv kxk (channel-first) -> SiLU
-> scan into K sequences (:class:`~mz_backbones.layers.scans.Cross2D` by default; ``Local2D``,
``Skip2D``, ... work the same) -> :class:`SelectiveSSM` (the K directions in one scan call) ->
optional per-direction channel attention (LocalMamba) -> merge (sum) -> out LayerNorm ->
``* SiLU(z)`` when gated -> ``out_proj``.

The VMamba variants map to keyword arguments, never to name suffixes: v0 is ``gate=True,
d_state=16, ssm_ratio=2.0``; v2 ``"v05_noz"`` is ``gate=False, d_state=1, conv_bias=False``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mz_kernels._validate import check_bool, check_positive_int

from .scans import Cross2D, ScanStrategy
from .ssm import SelectiveSSM


class ChannelAttention(nn.Module):
    """Squeeze-excite style channel gate of LocalMamba / EfficientVMamba (their ``BiAttn``):
    ``x * sigmoid(W2 GELU(W1 mean_tokens(LN x)))``, one gate per sample and channel.

    Args:
        channels: C.
        ratio: hidden width as a fraction of C (0.125 in both papers).
    """

    def __init__(self, channels: int, ratio: float = 0.125):
        super().__init__()
        check_positive_int("ChannelAttention", "channels", channels)
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"ChannelAttention: ratio must be in (0, 1], got {ratio!r}")
        hidden = max(1, int(channels * ratio))
        self.norm = nn.LayerNorm(channels)
        self.reduce = nn.Linear(channels, hidden)
        self.act = nn.GELU()
        self.expand = nn.Linear(hidden, channels)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Gate ``x [B, L, *, C]`` by statistics pooled over dim 1 (the tokens).

        ``mask`` (broadcastable to ``x[..., :1]``, 1 = real token, 0 = padding slot of a scan) keeps
        padded slots out of the mean, so the gate equals the one computed on the un-padded grid.
        """
        n = self.norm(x)
        if mask is None:
            pooled = n.mean(dim=1, keepdim=True)
        else:
            m = mask.to(n.dtype)
            pooled = (n * m).sum(dim=1, keepdim=True) / m.sum(dim=1, keepdim=True).clamp(min=1.0)
        gate = torch.sigmoid(self.expand(self.act(self.reduce(pooled))))
        return x * gate


class SS2D(nn.Module):
    """2D selective-scan mixer ``[B, H, W, dim] -> [B, H, W, dim]`` (channel-last tokens).

    Args:
        dim: model width d.
        scan: a 2D :class:`ScanStrategy` (default ``Cross2D()``, VMamba's 4-way cross scan); its
            ``num_dirs`` directions each get their own x_proj / dt_proj / A / D.
        d_state: SSM state size N (16 for VMamba v0, 1 for v2).
        ssm_ratio: d_inner = int(ssm_ratio * dim).
        dt_rank: ``"auto"`` (ceil(dim / 16)) or a positive int.
        d_conv: depthwise conv kernel (odd); 0 disables the conv.
        conv_bias: bias of the depthwise conv.
        gate: keep the z branch (``in_proj`` -> 2*d_inner, output ``* SiLU(z)``); False is VMamba's
            ``noz``.
        direction_attn: gate each direction's output by :class:`ChannelAttention` before the merge
            (LocalMamba).
        bias: bias of in_proj / out_proj.
        dropout: dropout after out_proj.

    Examples:
        >>> mixer = SS2D(32, d_state=1, ssm_ratio=1.0, gate=False)
        >>> mixer(torch.randn(2, 5, 7, 32)).shape
        torch.Size([2, 5, 7, 32])
    """

    def __init__(
        self,
        dim: int,
        *,
        scan: ScanStrategy | None = None,
        d_state: int = 16,
        ssm_ratio: float = 2.0,
        dt_rank: int | str = "auto",
        d_conv: int = 3,
        conv_bias: bool = True,
        gate: bool = True,
        direction_attn: bool = False,
        bias: bool = False,
        dropout: float = 0.0,
    ):
        super().__init__()
        op = "SS2D"
        check_positive_int(op, "dim", dim)
        check_positive_int(op, "d_state", d_state)
        check_bool(op, "gate", gate)
        check_bool(op, "conv_bias", conv_bias)
        check_bool(op, "direction_attn", direction_attn)
        scan = Cross2D() if scan is None else scan
        if not isinstance(scan, ScanStrategy) or 2 not in scan.spatial_dims:
            raise ValueError(f"{op}: scan must be a ScanStrategy over 2D grids (e.g. Cross2D()), got {scan!r}")
        if isinstance(ssm_ratio, bool) or not isinstance(ssm_ratio, (int, float)) or int(ssm_ratio * dim) < 1:
            raise ValueError(f"{op}: ssm_ratio must be a number with int(ssm_ratio * dim) >= 1, got {ssm_ratio!r}")
        if isinstance(d_conv, bool) or not isinstance(d_conv, int) or d_conv < 0 or (d_conv and d_conv % 2 == 0):
            raise ValueError(f"{op}: d_conv must be 0 (no conv) or a positive odd int, got {d_conv!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"{op}: dropout must be in [0, 1), got {dropout!r}")
        self.scan, self.gate = scan, gate
        self.d_inner = d_inner = int(ssm_ratio * dim)
        self.in_proj = nn.Linear(dim, d_inner * (2 if gate else 1), bias=bias)
        self.conv2d = (
            nn.Conv2d(d_inner, d_inner, d_conv, padding=d_conv // 2, groups=d_inner, bias=conv_bias) if d_conv else None
        )
        self.ssm = SelectiveSSM(d_inner, d_state, scan.num_dirs, dt_rank=dt_rank, dt_rank_base=dim)
        self.attn = ChannelAttention(d_inner) if direction_attn else None
        self.out_norm = nn.LayerNorm(d_inner)
        self.out_proj = nn.Linear(d_inner, dim, bias=bias)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        """``x [B, H, W, dim]`` -> ``[B, H, W, dim]``."""
        if x.dim() != 4:
            raise ValueError(f"SS2D: x must be [B, H, W, C] (channel-last), got shape {tuple(x.shape)}")
        B, H, W, _ = x.shape
        xz = self.in_proj(x)
        xs, z = xz.chunk(2, dim=-1) if self.gate else (xz, None)
        if self.conv2d is not None:
            xs = self.conv2d(xs.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        xs = F.silu(xs).reshape(B, H * W, self.d_inner).contiguous()
        seq = self.scan.scan(xs, (H, W))  # [B, L', K, C]
        y = self.ssm(seq)
        if self.attn is not None:
            y = self.attn(y, self._valid_slots(seq, (H, W)))
        y = self.out_norm(self.scan.merge(y, (H, W)))  # [B, L, C]
        if z is not None:
            y = y * F.silu(z.reshape(B, H * W, self.d_inner))
        return self.dropout(self.out_proj(y)).reshape(B, H, W, -1)

    def _valid_slots(self, seq: Tensor, grid: tuple[int, int]) -> Tensor:
        """``[1, L', K, 1]``: 1 where a scan slot holds a grid token, 0 where it is padding."""
        ones = torch.ones(1, grid[0] * grid[1], 1, device=seq.device, dtype=seq.dtype)
        return self.scan.scan(ones, grid)
