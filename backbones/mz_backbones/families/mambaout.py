"""MambaOut (Yu & Wang, CVPR'25): the SSM-free control, a 4-stage model of Gated CNN blocks.

Gated CNN block (channel-last): ``LN -> fc1 (dim -> 2 * hidden) -> split g, i, c -> DW-conv 7x7 on c
-> fc2(GELU(g) * [i, conv(c)]) -> + residual``, hidden = 8/3 * dim. Stem: two 3x3 stride-2 convs
with LN; downsampling: 3x3 stride-2 conv + LN; head: pool -> LN -> MLP (4x) -> classes.
Registered in the mambazoo registry (separate from timm's).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mz_kernels._validate import check_positive_int

from .._contract import Backbone
from .._registry import register_backbone
from ..layers.common import DropPath


class ConvLN(nn.Module):
    """3x3 stride-2 conv ``[B, Cin, H, W] -> [B, Cout, H/2, W/2]``, then LayerNorm over channels."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, 2, 1)
        self.norm = nn.LayerNorm(cout, eps=1e-6)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.conv(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class GatedCNNBlock(nn.Module):
    """``[B, H, W, C] -> [B, H, W, C]``."""

    def __init__(self, dim: int, *, expansion: float = 8 / 3, kernel_size: int = 7, conv_ratio: float = 1.0, drop_path: float = 0.0):
        super().__init__()
        hidden = int(expansion * dim)
        conv_ch = int(conv_ratio * dim)
        self.split = (hidden, hidden - conv_ch, conv_ch)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.fc1 = nn.Linear(dim, 2 * hidden)
        self.conv = nn.Conv2d(conv_ch, conv_ch, kernel_size, padding=kernel_size // 2, groups=conv_ch)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        g, i, c = self.fc1(self.norm(x)).split(self.split, dim=-1)
        c = self.conv(c.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return x + self.drop_path(self.fc2(F.gelu(g) * torch.cat((i, c), dim=-1)))


class MlpHead(nn.Module):
    """Pooled ``[B, C]`` -> LN -> fc1 (ratio x C) -> GELU -> LN -> fc2 -> ``[B, num_classes]``."""

    def __init__(self, dim: int, num_classes: int, ratio: float = 4.0):
        super().__init__()
        hidden = int(ratio * dim)
        self.fc1, self.norm, self.fc2 = nn.Linear(dim, hidden), nn.LayerNorm(hidden), nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.norm(F.gelu(self.fc1(x))))


class MambaOut(Backbone):
    """MambaOut; ``forward_stages`` returns 4 maps at strides 4, 8, 16, 32.

    Args:
        dims, depths: per-stage widths and depths.
        kernel_size, conv_ratio, expansion: Gated CNN block settings.
        head_ratio: hidden ratio of the MLP head.
    """

    def __init__(
        self,
        *,
        dims: tuple[int, ...] = (96, 192, 384, 576),
        depths: tuple[int, ...] = (3, 3, 9, 3),
        kernel_size: int = 7,
        conv_ratio: float = 1.0,
        expansion: float = 8 / 3,
        head_ratio: float = 4.0,
        in_chans: int = 3,
        num_classes: int = 1000,
        drop_path_rate: float = 0.0,
    ):
        super().__init__(spatial_dims=2, in_chans=in_chans, num_classes=num_classes, input_multiple=32)
        if len(dims) != 4 or len(depths) != 4:
            raise ValueError(f"MambaOut: dims and depths must have 4 entries, got {tuple(dims)}, {tuple(depths)}")
        for d in (*dims, *depths):
            check_positive_int("MambaOut", "dims/depths entry", d)
        self.head_ratio = head_ratio
        self.stem = nn.Sequential(ConvLN(in_chans, dims[0] // 2), nn.GELU(), ConvLN(dims[0] // 2, dims[0]))
        self.downsamples = nn.ModuleList([nn.Identity()] + [ConvLN(dims[i - 1], dims[i]) for i in range(1, 4)])
        total = sum(depths)
        dpr = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        cur, self.stages = 0, nn.ModuleList()
        for d, n in zip(dims, depths):
            self.stages.append(nn.ModuleList(
                GatedCNNBlock(d, expansion=expansion, kernel_size=kernel_size, conv_ratio=conv_ratio, drop_path=dpr[cur + j])
                for j in range(n)
            ))
            cur += n
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.feature_info = [dict(num_chs=d, reduction=4 * 2**i, module=f"stages.{i}") for i, d in enumerate(dims)]
        self.num_features = dims[-1]
        self.reset_classifier(num_classes)

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.head = MlpHead(self.num_features, num_classes, self.head_ratio) if num_classes > 0 else nn.Identity()

    def forward_stages(self, x: Tensor) -> list[Tensor]:
        x = self.stem(x)
        outs = []
        for down, stage in zip(self.downsamples, self.stages):
            x = down(x).permute(0, 2, 3, 1)
            for blk in stage:
                x = self.run_block(blk, x)
            x = x.permute(0, 3, 1, 2)
            outs.append(x)
        return outs

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """``[B, C, H, W]`` -> mean pool -> LN -> MLP head."""
        pooled = self.norm(x.mean(dim=(2, 3)))
        return pooled if pre_logits else self.head(pooled)


@register_backbone
def mambaout_tiny(**kwargs) -> MambaOut:
    """MambaOut-Tiny: 96-192-384-576, depths 3-3-9-3 (26.5M, IN-1k 82.7)."""
    return MambaOut(**{**dict(dims=(96, 192, 384, 576), depths=(3, 3, 9, 3)), **kwargs})


@register_backbone
def mambaout_small(**kwargs) -> MambaOut:
    """MambaOut-Small: 96-192-384-576, depths 3-4-27-3 (48.5M, IN-1k 84.1)."""
    return MambaOut(**{**dict(dims=(96, 192, 384, 576), depths=(3, 4, 27, 3)), **kwargs})


@register_backbone
def mambaout_test(**kwargs) -> MambaOut:
    """Tiny MambaOut for tests (timm's test_mambaout dims)."""
    return MambaOut(**{**dict(dims=(16, 32, 48, 64), depths=(1, 1, 2, 1)), **kwargs})
