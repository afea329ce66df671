"""MambaVision (Hatamizadeh & Kautz, CVPR'25): hybrid conv / Mamba / attention model.

Stem: 2 x (conv3x3 s2 + BN + ReLU) -> stride 4. Stages 1-2: conv residual blocks
(conv3x3-BN-GELU-conv3x3-BN). Stages 3-4 run on non-overlapping windows (the map is zero-padded to
the window; a window larger than the map is clipped to it): the first half of the blocks use the
MambaVisionMixer, the second half multi-head self-attention; each block is
``x + DP(mixer(LN x))``, ``x + DP(MLP(LN x))``. A 3x3 stride-2 conv downsamples between stages;
the head is BatchNorm -> average pool -> linear.

MambaVisionMixer (non-causal, one direction): ``in_proj`` d -> d_inner split into x and z; each
goes through its own depthwise conv1d (k=3, "same") + SiLU; S6 (d_state 8) runs on x only; the
SSM output and z are concatenated and projected by ``out_proj``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mz_kernels._validate import check_positive_int

from .._contract import Backbone
from .._registry import register_backbone
from ..layers.common import DropPath, Mlp
from ..layers.ssm import SelectiveSSM


class MambaVisionMixer(nn.Module):
    """``[B, L, dim] -> [B, L, dim]`` (see the module docstring)."""

    def __init__(self, dim: int, *, d_state: int = 8, d_conv: int = 3, expand: float = 1.0):
        super().__init__()
        self.d_inner = int(expand * dim)
        if self.d_inner % 2:
            raise ValueError(f"MambaVisionMixer: expand * dim must be even, got {self.d_inner}")
        half = self.d_inner // 2
        self.in_proj = nn.Linear(dim, self.d_inner)
        self.conv1d_x = nn.Conv1d(half, half, d_conv, padding="same", groups=half, bias=False)
        self.conv1d_z = nn.Conv1d(half, half, d_conv, padding="same", groups=half, bias=False)
        self.ssm = SelectiveSSM(half, d_state, 1, dt_rank="auto", dt_rank_base=dim)
        self.out_proj = nn.Linear(self.d_inner, dim)

    def forward(self, x: Tensor) -> Tensor:
        xs, z = self.in_proj(x).transpose(1, 2).chunk(2, dim=1)  # [B, half, L] each
        xs = F.silu(self.conv1d_x(xs)).transpose(1, 2)
        z = F.silu(self.conv1d_z(z)).transpose(1, 2)
        y = self.ssm(xs.unsqueeze(2).contiguous()).squeeze(2)
        return self.out_proj(torch.cat([y, z], dim=-1))


class Attention(nn.Module):
    """Multi-head self-attention ``[B, L, dim] -> [B, L, dim]``."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"Attention: dim must be divisible by num_heads, got dim={dim}, num_heads={num_heads}")
        self.num_heads = num_heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        B, L, C = x.shape
        q, k, v = self.qkv(x).reshape(B, L, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, L, C))


class HybridBlock(nn.Module):
    """``x + DP(g1 * mixer(LN x))``, ``x + DP(g2 * MLP(LN x))`` on window tokens ``[B', L, C]``."""

    def __init__(self, dim: int, *, attention: bool, num_heads: int, mlp_ratio: float, drop_path: float,
                 d_state: int, layer_scale: float | None):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.mixer = Attention(dim, num_heads) if attention else MambaVisionMixer(dim, d_state=d_state)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)
        ls = layer_scale is not None
        self.gamma_1 = nn.Parameter(torch.full((dim,), float(layer_scale))) if ls else None
        self.gamma_2 = nn.Parameter(torch.full((dim,), float(layer_scale))) if ls else None

    def forward(self, x: Tensor) -> Tensor:
        y = self.mixer(self.norm1(x))
        x = x + self.drop_path(y if self.gamma_1 is None else self.gamma_1 * y)
        y = self.mlp(self.norm2(x))
        return x + self.drop_path(y if self.gamma_2 is None else self.gamma_2 * y)


class ConvBlock(nn.Module):
    """``x + DP(BN(conv3x3(GELU(BN(conv3x3 x)))))`` on ``[B, C, H, W]``."""

    def __init__(self, dim: int, drop_path: float):
        super().__init__()
        self.conv1, self.norm1 = nn.Conv2d(dim, dim, 3, 1, 1), nn.BatchNorm2d(dim, eps=1e-5)
        self.conv2, self.norm2 = nn.Conv2d(dim, dim, 3, 1, 1), nn.BatchNorm2d(dim, eps=1e-5)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.drop_path(self.norm2(self.conv2(F.gelu(self.norm1(self.conv1(x))))))


def window_partition(x: Tensor, wh: int, ww: int) -> Tensor:
    """``[B, C, H, W]`` (H, W multiples of the window) -> ``[B * nW, wh * ww, C]``."""
    B, C, H, W = x.shape
    x = x.reshape(B, C, H // wh, wh, W // ww, ww).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(-1, wh * ww, C)


def window_reverse(w: Tensor, wh: int, ww: int, H: int, W: int) -> Tensor:
    """Inverse of :func:`window_partition`: ``[B * nW, wh * ww, C]`` -> ``[B, C, H, W]``."""
    C = w.shape[-1]
    x = w.reshape(-1, H // wh, W // ww, wh, ww, C).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(-1, C, H, W)


class WindowStage(nn.Module):
    """Mamba then attention blocks on non-overlapping windows of ``[B, C, H, W]``."""

    def __init__(self, dim: int, depth: int, *, num_heads: int, window: int, mlp_ratio: float,
                 dpr: list[float], d_state: int, layer_scale: float | None):
        super().__init__()
        self.window = window
        first_attn = depth // 2 + 1 if depth % 2 else depth // 2
        self.blocks = nn.ModuleList(
            HybridBlock(dim, attention=j >= first_attn, num_heads=num_heads, mlp_ratio=mlp_ratio,
                        drop_path=dpr[j], d_state=d_state, layer_scale=layer_scale)
            for j in range(depth)
        )

    def forward(self, x: Tensor, run_block) -> Tensor:
        B, C, H, W = x.shape
        wh, ww = min(self.window, H), min(self.window, W)
        Hp, Wp = math.ceil(H / wh) * wh, math.ceil(W / ww) * ww
        x = F.pad(x, (0, Wp - W, 0, Hp - H))
        t = window_partition(x, wh, ww)
        for blk in self.blocks:
            t = run_block(blk, t)
        return window_reverse(t, wh, ww, Hp, Wp)[:, :, :H, :W]


class MambaVision(Backbone):
    """MambaVision; ``forward_stages`` returns 4 maps at strides 4, 8, 16, 32 (the last after BN).

    Args:
        dim: stage-1 width (doubles per stage); in_dim: stem hidden width.
        depths, num_heads, windows: per-stage depth, attention heads, window size (stages 3-4).
        mlp_ratio, d_state, layer_scale (``None`` = off), drop_path_rate.
    """

    def __init__(
        self,
        *,
        dim: int = 80,
        in_dim: int = 32,
        depths: tuple[int, ...] = (1, 3, 8, 4),
        num_heads: tuple[int, ...] = (2, 4, 8, 16),
        windows: tuple[int, ...] = (8, 8, 14, 7),
        mlp_ratio: float = 4.0,
        d_state: int = 8,
        layer_scale: float | None = None,
        in_chans: int = 3,
        num_classes: int = 1000,
        drop_path_rate: float = 0.0,
    ):
        super().__init__(spatial_dims=2, in_chans=in_chans, num_classes=num_classes, input_multiple=32)
        if not len(depths) == len(num_heads) == len(windows) == 4:
            raise ValueError(f"MambaVision: depths, num_heads, windows must have 4 entries, got {depths}, {num_heads}, {windows}")
        check_positive_int("MambaVision", "dim", dim)
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, in_dim, 3, 2, 1, bias=False), nn.BatchNorm2d(in_dim, eps=1e-4), nn.ReLU(),
            nn.Conv2d(in_dim, dim, 3, 2, 1, bias=False), nn.BatchNorm2d(dim, eps=1e-4), nn.ReLU(),
        )
        total = sum(depths)
        dpr = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        dims = [dim * 2**i for i in range(4)]
        self.stages, self.downsamples = nn.ModuleList(), nn.ModuleList()
        cur = 0
        for i in range(4):
            d, n = dims[i], depths[i]
            if i < 2:
                self.stages.append(nn.ModuleList(ConvBlock(d, dpr[cur + j]) for j in range(n)))
            else:
                self.stages.append(WindowStage(d, n, num_heads=num_heads[i], window=windows[i], mlp_ratio=mlp_ratio,
                                               dpr=dpr[cur:cur + n], d_state=d_state, layer_scale=layer_scale))
            self.downsamples.append(nn.Conv2d(d, 2 * d, 3, 2, 1, bias=False) if i < 3 else nn.Identity())
            cur += n
        self.norm = nn.BatchNorm2d(dims[-1])
        self.feature_info = [dict(num_chs=d, reduction=4 * 2**i, module=f"stages.{i}") for i, d in enumerate(dims)]
        self.num_features = dims[-1]
        self.reset_classifier(num_classes)

    def forward_stages(self, x: Tensor) -> list[Tensor]:
        x = self.stem(x)
        outs = []
        for i, (stage, down) in enumerate(zip(self.stages, self.downsamples)):
            if i < 2:
                for blk in stage:
                    x = self.run_block(blk, x)
            else:
                x = stage(x, self.run_block)
            outs.append(self.norm(x) if i == 3 else x)
            x = down(x)
        return outs


def _create(cfg: dict, kwargs: dict) -> MambaVision:
    return MambaVision(**{**cfg, **kwargs})


@register_backbone
def mambavision_t(**kwargs) -> MambaVision:
    """MambaVision-T: dim 80, depths 1-3-8-4 (31.8M, IN-1k 82.3)."""
    return _create(dict(dim=80, in_dim=32, depths=(1, 3, 8, 4), num_heads=(2, 4, 8, 16)), kwargs)


@register_backbone
def mambavision_s(**kwargs) -> MambaVision:
    """MambaVision-S: dim 96, depths 3-3-7-5 (50.1M, IN-1k 83.3)."""
    return _create(dict(dim=96, in_dim=64, depths=(3, 3, 7, 5), num_heads=(2, 4, 8, 16)), kwargs)


@register_backbone
def mambavision_test(**kwargs) -> MambaVision:
    """Tiny MambaVision for tests (windows 4 / 2 so that a 64 x 96 input has several windows)."""
    return _create(dict(dim=8, in_dim=8, depths=(1, 1, 3, 2), num_heads=(1, 1, 2, 2), windows=(4, 4, 3, 2),
                        d_state=4, mlp_ratio=2.0), kwargs)
