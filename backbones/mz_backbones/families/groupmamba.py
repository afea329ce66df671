"""GroupMamba (Shaker et al., arXiv 2407.13772): hierarchical model of Modulated Group Mamba layers.

A layer splits the channels into 4 groups; group g runs a single-direction VSSS branch (in_proj ->
DW-conv3x3 -> SiLU -> S6 (d_state 1) -> LN -> * SiLU(z) -> out_proj) along direction g of the
``cross4`` orders (row-major, column-major, reversed row-major, reversed column-major: ->, v, <-, ^).
The 4 groups are folded into ONE selective-scan call (group g = scan group g). The concatenated
result is multiplied by the normalised input and by the channel-affinity gate (SE-style, from the
token mean), normalised again and projected. Blocks: ``x + DP(layer(x))``, ``x + DP(FFN(LN x))``
with a DW-conv FFN. The head pools to one token, refines it with one more layer + FFN, then LN.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import mz_kernels as mk
from mz_kernels._validate import check_positive_int

from .._contract import Backbone
from .._registry import register_backbone
from ..layers.common import DropPath
from ..layers.ssm import SelectiveSSM

GROUPS = 4


class GroupScan(nn.Module):
    """Four single-direction VSSS branches on 4 channel groups ``[B, H, W, C] -> [B, H, W, C]``."""

    def __init__(self, dim: int, *, d_state: int = 1, expand: float = 1.0, d_conv: int = 3):
        super().__init__()
        if dim % GROUPS:
            raise ValueError(f"GroupScan: dim must be divisible by {GROUPS}, got {dim}")
        self.cg = dim // GROUPS
        self.ci = int(expand * self.cg)
        G, cg, ci = GROUPS, self.cg, self.ci
        self.in_proj = nn.Conv2d(dim, G * 2 * ci, 1, groups=G, bias=False)
        self.conv2d = nn.Conv2d(G * ci, G * ci, d_conv, padding=d_conv // 2, groups=G * ci)
        self.ssm = SelectiveSSM(ci, d_state, G, dt_rank="auto", dt_rank_base=cg)
        self.out_norm_weight = nn.Parameter(torch.ones(G, ci))
        self.out_norm_bias = nn.Parameter(torch.zeros(G, ci))
        self.out_proj_weight = nn.Parameter(torch.empty(G, cg, ci))
        nn.init.trunc_normal_(self.out_proj_weight, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        Bsz, H, W, _ = x.shape
        G, ci, L = GROUPS, self.ci, H * W
        xz = self.in_proj(x.permute(0, 3, 1, 2)).reshape(Bsz, G, 2, ci, H, W)
        xs, z = xz[:, :, 0], xz[:, :, 1]
        xs = F.silu(self.conv2d(xs.reshape(Bsz, G * ci, H, W)))
        tokens = xs.reshape(Bsz, G * ci, L).transpose(1, 2).contiguous()  # [B, L, G*ci], group-major channels
        # direction k of every group, keep the (direction k, group k) diagonal: [B, L, G, ci]
        seq = mk.cross_scan_2d(tokens, H, W, mode="cross4").reshape(Bsz, L, G, G, ci)
        seq = torch.diagonal(seq, dim1=2, dim2=3).movedim(-1, 2).contiguous()
        y = self.ssm(seq)  # [B, L, G, ci]; group g has its own x_proj/dt_proj/A/D
        full = torch.diag_embed(y.movedim(2, -1)).permute(0, 1, 3, 4, 2)  # [B, L, K, G, ci], zero off-diagonal
        y = mk.cross_merge_2d(full.reshape(Bsz, L, G, G * ci).contiguous(), H, W, mode="cross4").reshape(Bsz, L, G, ci)
        y = F.layer_norm(y, (ci,)) * self.out_norm_weight + self.out_norm_bias
        y = y * F.silu(z.reshape(Bsz, G, ci, L).permute(0, 3, 1, 2))
        out = torch.einsum("blgi,goi->blgo", y, self.out_proj_weight)
        return out.reshape(Bsz, H, W, G * self.cg)


class GroupMambaLayer(nn.Module):
    """Modulated group Mamba ``[B, H, W, C] -> [B, H, W, C]`` (includes its own input LayerNorm)."""

    def __init__(self, dim: int, *, d_state: int = 1, reduction: int = 16):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, max(dim // reduction, 1))
        self.fc2 = nn.Linear(max(dim // reduction, 1), dim)
        self.scan = GroupScan(dim, d_state=d_state)
        self.skip_scale = nn.Parameter(torch.ones(1))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm(x)
        affinity = torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean(dim=(1, 2))))))  # [B, C]
        y = self.scan(x) * self.skip_scale * x * affinity[:, None, None]
        return self.proj(self.norm(y))


class ConvFFN(nn.Module):
    """fc1 -> DW-conv3x3 -> GELU -> fc2 on ``[B, H, W, C]``."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)

    def forward(self, x: Tensor) -> Tensor:
        x = self.fc1(x)
        x = self.dwconv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.fc2(F.gelu(x))


class GroupMambaBlock(nn.Module):
    def __init__(self, dim: int, mlp_ratio: float, drop_path: float = 0.0, d_state: int = 1):
        super().__init__()
        self.attn = GroupMambaLayer(dim, d_state=d_state)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = ConvFFN(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        """``[B, H, W, C]`` -> ``[B, H, W, C]``."""
        x = x + self.drop_path(self.attn(x))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class GroupMamba(Backbone):
    """GroupMamba; ``forward_stages`` returns 4 maps at strides 4, 8, 16, 32.

    Args:
        dims, depths, mlp_ratios: per-stage widths (each divisible by 4), depths, FFN ratios.
        stem_dim: hidden width of the conv stem.
        d_state: SSM state size (1 as published).
        drop_path_rate: stochastic depth, linear over all blocks.
    """

    def __init__(
        self,
        *,
        dims: tuple[int, ...] = (64, 128, 348, 448),
        depths: tuple[int, ...] = (3, 4, 9, 3),
        mlp_ratios: tuple[float, ...] = (8, 8, 4, 4),
        stem_dim: int = 32,
        d_state: int = 1,
        in_chans: int = 3,
        num_classes: int = 1000,
        drop_path_rate: float = 0.0,
    ):
        super().__init__(spatial_dims=2, in_chans=in_chans, num_classes=num_classes, input_multiple=32)
        if not len(dims) == len(depths) == len(mlp_ratios) == 4:
            raise ValueError(f"GroupMamba: dims, depths, mlp_ratios must have 4 entries, got {dims}, {depths}, {mlp_ratios}")
        for d in dims:
            if d % GROUPS:
                raise ValueError(f"GroupMamba: every dim must be divisible by {GROUPS}, got dims={tuple(dims)}")
        check_positive_int("GroupMamba", "stem_dim", stem_dim)
        s = stem_dim
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, s, 7, 2, 3, bias=False), nn.BatchNorm2d(s), nn.ReLU(True),
            nn.Conv2d(s, s, 3, 1, 1, bias=False), nn.BatchNorm2d(s), nn.ReLU(True),
            nn.Conv2d(s, s, 3, 1, 1, bias=False), nn.BatchNorm2d(s), nn.ReLU(True),
        )
        total = sum(depths)
        dpr = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        self.downsamples = nn.ModuleList()
        self.down_norms = nn.ModuleList()
        self.stages = nn.ModuleList()
        self.norms = nn.ModuleList()
        cur = 0
        for i, (d, n, r) in enumerate(zip(dims, depths, mlp_ratios)):
            self.downsamples.append(nn.Conv2d(s if i == 0 else dims[i - 1], d, 3, 2, 1))
            self.down_norms.append(nn.LayerNorm(d))
            self.stages.append(nn.ModuleList(GroupMambaBlock(d, r, dpr[cur + j], d_state) for j in range(n)))
            self.norms.append(nn.LayerNorm(d, eps=1e-6))
            cur += n
        self.cls_attn = GroupMambaLayer(dims[-1], d_state=d_state)
        self.cls_norm1 = nn.LayerNorm(dims[-1], eps=1e-6)
        self.cls_norm2 = nn.LayerNorm(dims[-1], eps=1e-6)
        self.cls_mlp = nn.Sequential(nn.Linear(dims[-1], int(dims[-1] * mlp_ratios[-1])), nn.GELU(),
                                     nn.Linear(int(dims[-1] * mlp_ratios[-1]), dims[-1]))
        self.feature_info = [dict(num_chs=d, reduction=4 * 2**i, module=f"stages.{i}") for i, d in enumerate(dims)]
        self.num_features = dims[-1]
        self.reset_classifier(num_classes)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward_stages(self, x: Tensor) -> list[Tensor]:
        x = self.stem(x)
        outs = []
        for i in range(4):
            x = self.down_norms[i](self.downsamples[i](x).permute(0, 2, 3, 1))  # [B, H, W, C]
            for blk in self.stages[i]:
                x = self.run_block(blk, x)
            x = self.norms[i](x) if i < 3 else x
            x = x.permute(0, 3, 1, 2)
            outs.append(x)
        return outs

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Last map ``[B, C, H, W]`` -> pooled token refined by the class block -> LN -> classifier."""
        cls = x.mean(dim=(2, 3))[:, None, None, :]  # [B, 1, 1, C]
        cls = cls + self.cls_norm1(self.cls_attn(cls))
        cls = cls + self.cls_mlp(self.cls_norm2(cls))
        pooled = self.norms[3](cls.flatten(1))
        return pooled if pre_logits else self.head(pooled)


def _create(cfg: dict, kwargs: dict) -> GroupMamba:
    return GroupMamba(**{**cfg, **kwargs})


@register_backbone
def groupmamba_tiny(**kwargs) -> GroupMamba:
    """GroupMamba-T: dims 64-128-348-448, depths 3-4-9-3 (23M, IN-1k 83.3)."""
    return _create(dict(dims=(64, 128, 348, 448), depths=(3, 4, 9, 3), stem_dim=32), kwargs)


@register_backbone
def groupmamba_small(**kwargs) -> GroupMamba:
    """GroupMamba-S: dims 64-128-348-512, depths 3-4-16-3 (34M, IN-1k 83.9)."""
    return _create(dict(dims=(64, 128, 348, 512), depths=(3, 4, 16, 3), stem_dim=64), kwargs)


@register_backbone
def groupmamba_test(**kwargs) -> GroupMamba:
    """Tiny GroupMamba for tests."""
    return _create(dict(dims=(16, 24, 32, 40), depths=(1, 1, 2, 1), mlp_ratios=(2, 2, 2, 2), stem_dim=8), kwargs)
