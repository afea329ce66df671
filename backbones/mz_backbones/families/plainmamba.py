"""PlainMamba (Yang et al., BMVC'24): a plain (non-hierarchical) model of zig-zag Mamba blocks.

Conv patch embed (stride 16) -> learned position embedding (resized for any input size) -> depth x
``x + DropPath(PlainMamba2D(LN x))`` -> LN. PlainMamba2D: ``in_proj`` (2 * d_inner) -> depthwise conv2d
7x7 -> SiLU -> 4 continuous snake routes with ONE shared x_proj/dt_proj/A/D and a learned
``direction_Bs [5, d_state]`` added to B per token by the direction of the move that reached it ->
sum of the un-permuted routes -> ``* SiLU(z)`` -> ``out_proj``. No MLP, no cls token.

Official checkpoints (ChenhongyiYang/PlainMamba, mmcls layout ``backbone.layers.{i}.mamba.*``,
``backbone.ln1.*``, ``head.fc.*``) load through :meth:`PlainMamba.checkpoint_filter_fn`.
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mz_kernels import selective_scan
from mz_kernels._validate import check_choice, check_positive_int

from .._contract import Backbone
from .._registry import register_backbone
from ..layers.common import DropPath, resample_pos_embed
from ..layers.scans import Zigzag2D
from ..layers.ssm import SelectiveSSM

BC_ORDERS = ("route", "raster")


class PlainMamba2D(nn.Module):
    """The PlainMamba token mixer ``[B, L, dim] -> [B, L, dim]`` on an ``(H, W)`` grid.

    Args:
        dim: model width.
        d_state: SSM state size N.
        expand: d_inner = expand * dim.
        conv_size: depthwise conv2d kernel (odd).
        bias: biases of ``in_proj`` / ``out_proj`` (the released models use them).
        bc_order: where dt/B/C are read. ``"route"`` (default): from the same scanned token as the
            input, as the paper describes. ``"raster"``: from the raster-order token at the same
            step index, which is what the released code computes (its x_proj runs before the
            permutation); use it for output parity with the official weights.
    """

    def __init__(
        self,
        dim: int,
        *,
        d_state: int = 16,
        expand: int = 2,
        conv_size: int = 7,
        bias: bool = True,
        conv_bias: bool = True,
        bc_order: str = "route",
    ):
        super().__init__()
        check_positive_int("PlainMamba2D", "dim", dim)
        check_choice("PlainMamba2D", "bc_order", bc_order, BC_ORDERS)
        if conv_size % 2 != 1:
            raise ValueError(f"PlainMamba2D: conv_size must be odd, got {conv_size!r}")
        self.bc_order = bc_order
        self.d_inner = int(expand * dim)
        self.scan = Zigzag2D(routes=4)
        self.in_proj = nn.Linear(dim, 2 * self.d_inner, bias=bias)
        self.conv2d = nn.Conv2d(
            self.d_inner, self.d_inner, conv_size, padding=conv_size // 2, groups=self.d_inner, bias=conv_bias
        )
        self.ssm = SelectiveSSM(self.d_inner, d_state, 4, dt_rank="auto", dt_rank_base=dim, share_params=True)
        self.direction_Bs = nn.Parameter(torch.empty(5, d_state))
        nn.init.trunc_normal_(self.direction_Bs, std=0.02)
        self.out_proj = nn.Linear(self.d_inner, dim, bias=bias)

    def forward(self, x: Tensor, grid: tuple[int, int]) -> Tensor:
        """``x [B, H*W, dim]`` (row-major tokens of ``grid = (H, W)``) -> ``[B, H*W, dim]``."""
        Bsz, L, _ = x.shape
        H, W = grid
        C = self.d_inner
        xs, z = self.in_proj(x).chunk(2, dim=-1)
        xs = self.conv2d(xs.transpose(1, 2).reshape(Bsz, C, H, W))
        xs = F.silu(xs).flatten(2).transpose(1, 2).contiguous()  # [B, L, C] raster
        seq = self.scan.scan(xs, grid)  # [B, L, 4, C]
        ids = self.scan.direction_ids(grid, device=x.device)  # [4, L]
        extra_B = self.direction_Bs[ids.t()]  # [L, 4, N]
        y = self.ssm(seq, extra_B=extra_B) if self.bc_order == "route" else self._raster_bc_scan(xs, seq, extra_B)
        return self.out_proj(self.scan.merge(y, grid) * F.silu(z))

    def _raster_bc_scan(self, xs: Tensor, seq: Tensor, extra_B: Tensor) -> Tensor:
        """The released code's scan: dt/B/C from the raster tokens, u along each route."""
        ssm = self.ssm
        Bsz, L, K, C = seq.shape
        R, N = ssm.dt_rank, ssm.d_state
        with torch.autocast(device_type=xs.device.type, enabled=False):
            x_dbl = xs.float() @ ssm.x_proj_weight[0].float().t()  # [B, L, R + 2N]
            dt, Bm, Cm = x_dbl.split([R, N, N], dim=-1)
            dt = dt @ ssm.dt_proj_weight[0].float().t()  # [B, L, C]
            dt = dt[:, :, None].expand(Bsz, L, K, C).reshape(Bsz, L, K * C)
            Bm = Bm[:, :, None] + extra_B.float()  # [B, L, K, N]
            Cm = Cm[:, :, None].expand(Bsz, L, K, N)
            A = (-torch.exp(ssm.A_log[0].float())).repeat(K, 1)
            y, _ = selective_scan(
                seq.float().reshape(Bsz, L, K * C),
                dt.contiguous(),
                A.contiguous(),
                Bm.contiguous(),
                Cm.contiguous(),
                D=ssm.D[0].float().repeat(K),
                delta_bias=ssm.dt_bias[0].float().repeat(K),
                delta_softplus=True,
                backend=ssm.backend,
            )
        return y.reshape(Bsz, L, K, C).to(seq.dtype)


class PlainMambaLayer(nn.Module):
    """``x + DropPath(PlainMamba2D(LN x))``, optionally followed by DW-conv3x3 + BN + GELU (L1, layer 0)."""

    def __init__(self, dim: int, *, drop_path: float = 0.0, with_dwconv: bool = False, **mixer_kw):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mamba = PlainMamba2D(dim, **mixer_kw)
        self.drop_path = DropPath(drop_path)
        self.dw = (
            nn.Sequential(nn.Conv2d(dim, dim, 3, padding=1, groups=dim, bias=False), nn.BatchNorm2d(dim), nn.GELU())
            if with_dwconv else None
        )

    def forward(self, x: Tensor, grid: tuple[int, int]) -> Tensor:
        """``x [B, H*W, dim]`` -> ``[B, H*W, dim]``."""
        x = x + self.drop_path(self.mamba(self.norm(x), grid))
        if self.dw is not None:
            Bsz, L, Cd = x.shape
            x = self.dw(x.transpose(1, 2).reshape(Bsz, Cd, *grid)).flatten(2).transpose(1, 2)
        return x


class ConvPatchEmbed(nn.Module):
    """Conv7x7/s2 (64 ch) + BN + ReLU, ``num_convs`` x (conv3x3 + BN + ReLU), conv 8x8/s8 -> stride 16."""

    def __init__(self, in_chans: int, embed_dim: int, num_convs: int = 1, width: int = 64):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_chans, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width), nn.ReLU(True))
        layers: list[nn.Module] = []
        for _ in range(num_convs):
            layers += [nn.Conv2d(width, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(True)]
        self.convs = nn.Sequential(*layers) if layers else None
        self.projection = nn.Conv2d(width, embed_dim, 8, 8)

    def forward(self, x: Tensor) -> Tensor:
        """``[B, in_chans, H, W]`` -> ``[B, embed_dim, H/16, W/16]``."""
        x = self.stem(x)
        if self.convs is not None:
            x = self.convs(x)
        return self.projection(x)


class PlainMamba(Backbone):
    """PlainMamba classifier/backbone; ``forward_stages`` returns ``num_taps`` maps ``[B, C, H/16, W/16]``
    taken after evenly spaced layers (the last one after the final LayerNorm).

    Args:
        embed_dim, depth: width and number of layers (L1: 192 x 24, L2: 384 x 24).
        d_state, expand, conv_size: mixer hyper-parameters.
        patch_convs: extra 3x3 convs in the patch embed (L1: 1, L2/L3: 2).
        dwconv_layers: layers followed by DW-conv3x3 + BN + GELU (L1: ``(0,)``).
        img_size: the input size the position embedding is built for (others are resized to).
        num_taps: number of feature levels in ``feature_info``.
        bc_order: see :class:`PlainMamba2D`.

    Examples:
        >>> m = create_backbone("plainmamba_test", num_classes=10)
        >>> m(torch.randn(2, 3, 64, 96)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        *,
        embed_dim: int = 192,
        depth: int = 24,
        d_state: int = 16,
        expand: int = 2,
        conv_size: int = 7,
        patch_convs: int = 1,
        dwconv_layers: tuple[int, ...] = (0,),
        img_size: int | tuple[int, int] = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        num_taps: int = 4,
        bc_order: str = "route",
    ):
        super().__init__(spatial_dims=2, in_chans=in_chans, num_classes=num_classes, input_multiple=16)
        for name, v in (("embed_dim", embed_dim), ("depth", depth), ("d_state", d_state), ("num_taps", num_taps)):
            check_positive_int("PlainMamba", name, v)
        if num_taps > depth:
            raise ValueError(f"PlainMamba: num_taps must be <= depth={depth}, got {num_taps}")
        size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        if len(size) != 2 or any(s < 16 or s % 16 for s in size):
            raise ValueError(f"PlainMamba: img_size must be a multiple of 16 (int or (H, W)), got {img_size!r}")
        self.pos_grid = (size[0] // 16, size[1] // 16)
        self.patch_embed = ConvPatchEmbed(in_chans, embed_dim, patch_convs)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.pos_grid[0] * self.pos_grid[1], embed_dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.layers = nn.ModuleList(
            PlainMambaLayer(
                embed_dim, drop_path=dpr[i], with_dwconv=i in dwconv_layers,
                d_state=d_state, expand=expand, conv_size=conv_size, bc_order=bc_order,
            )
            for i in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.taps = [depth * (t + 1) // num_taps - 1 for t in range(num_taps)]
        self.feature_info = [dict(num_chs=embed_dim, reduction=16, module=f"layers.{i}") for i in self.taps]
        self.num_features = embed_dim
        self.reset_classifier(num_classes)
        self.apply(self._init_linear)

    @staticmethod
    def _init_linear(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward_stages(self, x: Tensor) -> list[Tensor]:
        x = self.patch_embed(x)
        Bsz, Cd, H, W = x.shape
        x = x.flatten(2).transpose(1, 2)
        x = self.pos_drop(x + resample_pos_embed(self.pos_embed, (H, W), self.pos_grid).to(x.dtype))
        outs = []
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = self.run_block(layer, x, (H, W))
            if i == last:
                x = self.norm(x)
            if i in self.taps:
                outs.append(x.transpose(1, 2).reshape(Bsz, Cd, H, W))
        return outs

    def checkpoint_filter_fn(self, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """Map the official mmcls layout onto ours; our own layout passes through unchanged.

        ``backbone.`` prefix dropped; ``head.fc.*`` -> ``head.*``; ``ln1.*`` -> ``norm.*``;
        ``mamba.{x_proj.weight, dt_proj.weight, dt_proj.bias, A_log, D}`` -> ``mamba.ssm.{x_proj_weight,
        dt_proj_weight, dt_bias, A_log, D}`` with a leading direction axis of 1; ``pos_embed``
        resized to this model's grid.
        """
        if not any(k.startswith("backbone.") or ".mamba.x_proj." in k for k in state_dict):
            return state_dict
        ssm_map = {"x_proj.weight": "x_proj_weight", "dt_proj.weight": "dt_proj_weight", "dt_proj.bias": "dt_bias",
                   "A_log": "A_log", "D": "D"}
        out: dict[str, Tensor] = {}
        for k, v in state_dict.items():
            k = k[len("backbone."):] if k.startswith("backbone.") else k
            if k.startswith("neck."):
                continue
            if k.startswith("head.fc."):
                k = "head." + k[len("head.fc."):]
            elif k.startswith("ln1."):
                k = "norm." + k[len("ln1."):]
            m = re.match(r"(layers\.\d+\.mamba\.)(x_proj\.weight|dt_proj\.weight|dt_proj\.bias|A_log|D)$", k)
            if m:
                k, v = m.group(1) + "ssm." + ssm_map[m.group(2)], v.unsqueeze(0)
            elif k == "pos_embed":
                n = v.shape[1]
                side = int(round(n**0.5))
                if side * side != n:
                    raise ValueError(f"PlainMamba: official pos_embed must hold a square grid, got {n} tokens")
                v = resample_pos_embed(v, self.pos_grid, (side, side))
            out[k] = v
        return out


_ARCHS = {
    "l1": dict(embed_dim=192, depth=24, patch_convs=1, dwconv_layers=(0,)),
    "l2": dict(embed_dim=384, depth=24, patch_convs=2, dwconv_layers=()),
    "l3": dict(embed_dim=448, depth=36, patch_convs=2, dwconv_layers=()),
    "test": dict(embed_dim=32, depth=4, d_state=4, patch_convs=1, dwconv_layers=(0,), img_size=64),
}


def _create(arch: str, kwargs: dict) -> PlainMamba:
    return PlainMamba(**{**_ARCHS[arch], **kwargs})


@register_backbone
def plainmamba_l1(**kwargs) -> PlainMamba:
    """PlainMamba-L1: 192 x 24, 7.3M params, IN-1k 77.9."""
    return _create("l1", kwargs)


@register_backbone
def plainmamba_l2(**kwargs) -> PlainMamba:
    """PlainMamba-L2: 384 x 24, 25.7M params, IN-1k 81.6."""
    return _create("l2", kwargs)


@register_backbone
def plainmamba_l3(**kwargs) -> PlainMamba:
    """PlainMamba-L3: 448 x 36, 50.5M params, IN-1k 82.3."""
    return _create("l3", kwargs)


@register_backbone
def plainmamba_test(**kwargs) -> PlainMamba:
    """Tiny PlainMamba for tests (32 x 4, d_state 4, built for 64x64)."""
    return _create("test", kwargs)
