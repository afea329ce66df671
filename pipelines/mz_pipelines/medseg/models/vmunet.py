"""2D VMamba U-Nets: VM-UNet-style (:class:`VMUNet`) and MSVM-UNet-style (:class:`MSVMUNet`), with an
MHS-VM-style multi-head route mixer (``route="mhs"``).

- **VM-UNet** (JCruan519/VM-UNet): the zoo's VMamba v0 encoder (4x4 patch stem, patch merging,
  gated SS2D, strides 4/8/16/32); decoder of VSS blocks with Swin-UNet patch expanding (Linear to
  2*dim, 2x2 pixel shuffle, LayerNorm), additive skips, a final 4x patch expanding to dim/4 channels
  and a 1x1 conv head.
- **MSVM-UNet** (gndlwch2w/msvm-unet): the zoo's VMamba v2 encoder (``vmamba_tiny`` layout);
  decoder of MS-VSS blocks (SS2D, then an MLP whose hidden layer runs depthwise convs with kernels
  1, 3 and 5, summed), LKPE upsampling (1x1 conv to 2*dim, 3x3 depthwise conv, 2x pixel shuffle),
  and FLKPE (1x1 conv to 16*dim, 3x3 depthwise conv, 4x pixel shuffle) before the class head.
- **MHS route** (PixDeep/MHS-VM): every SS2D (encoder and decoder) is replaced by
  :class:`MultiHeadRouteSS2D`: the inner channels are split into ``heads`` low-dimensional
  subspaces, each scanned along its own route (snake and raster routes from
  :mod:`mz_kernels.scan_orders`), all heads in one selective-scan call, then merged, normalised and
  projected back. ``route_fusion="sra"`` follows MHS-VM more closely: each head scans a pair of
  routes and their reverses (four sequences) and fuses them with scan-route attention (the sum of the
  four, weighted per channel and token by ``relu(cv - t)``, ``cv`` their coefficient of variation).

Differences from the releases: skips come from the encoder's stage outputs (after the blocks, as
the zoo's ``forward_stages`` returns them), not from the stage inputs; no ImageNet weights are
loaded (pass ``pretrained`` to the zoo if needed). Stride 32: any H, W that are multiples of 32.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import mz_kernels as mk
from mz_backbones.families.vmamba import V0, V2, VMamba, VSSBlock, init_vmamba_weights, stage_dims
from mz_backbones.layers.common import DropPath
from mz_backbones.layers.ss2d import SS2D
from mz_backbones.layers.ssm import SelectiveSSM
from mz_kernels._validate import check_choice, check_positive_int

from .registry import check_model_input

ROUTES = ("cross4", "mhs")
# MHS route pool, head h takes entry h: snake routes (zigzag ids 0, 2, 1, 3, 4, 6, 5, 7), then the
# four raster routes of the cross scan
_ROUTE_POOL = tuple(("zigzag", k) for k in (0, 2, 1, 3, 4, 6, 5, 7)) + tuple(("cross4", k) for k in range(4))
MAX_HEADS = len(_ROUTE_POOL)


ROUTE_FUSIONS = ("single", "sra")
# scan-route attention: head h scans the pair _SRA_PAIRS[h] of pool routes and their reverses, 12
# different scans in all: row + column raster (MHS-VM's cross pattern), the four row snakes (from the
# top-left and top-right corners, reversed), the four column snakes (top-left, bottom-left, reversed).
# MHS-VM's fourth pattern needs diagonal routes, which the scan-order kernels do not have.
_SRA_PAIRS = ((("cross4", 0), ("cross4", 1)), (("zigzag", 0), ("zigzag", 4)), (("zigzag", 2), ("zigzag", 6)))
MAX_SRA_HEADS = len(_SRA_PAIRS)


def _route_pool(H: int, W: int, device: torch.device | None) -> dict[str, Tensor]:
    tokens = torch.arange(H * W, dtype=torch.float64, device=device).view(1, H * W, 1)
    return {"zigzag": mk.zigzag_scan_2d(tokens, H, W, routes=8)[0, :, :, 0].long(),  # [L, 8]
            "cross4": mk.cross_scan_2d(tokens, H, W, mode="cross4")[0, :, :, 0].long()}  # [L, 4]


def route_orders(H: int, W: int, heads: int, device: torch.device | None = None) -> Tensor:
    """``[heads, H*W]`` long: ``out[h, j]`` = grid token (row-major) at position ``j`` of head ``h``'s route."""
    check_positive_int("route_orders", "heads", heads)
    if heads > MAX_HEADS:
        raise ValueError(f"route_orders: heads must be at most {MAX_HEADS} (routes available), got {heads}")
    pool = _route_pool(H, W, device)
    return torch.stack([pool[kind][:, k] for kind, k in _ROUTE_POOL[:heads]])


def sra_route_orders(H: int, W: int, heads: int, device: torch.device | None = None) -> Tensor:
    """``[heads, 4, H*W]`` long: head ``h`` reads route ``a``, ``a`` reversed, ``b``, ``b`` reversed
    (``(a, b) = _SRA_PAIRS[h]``); entries are row-major grid tokens."""
    check_positive_int("sra_route_orders", "heads", heads)
    if heads > MAX_SRA_HEADS:
        raise ValueError(f"sra_route_orders: heads must be at most {MAX_SRA_HEADS} (route pairs available), got {heads}")
    pool = _route_pool(H, W, device)
    out = []
    for (ka, ia), (kb, ib) in _SRA_PAIRS[:heads]:
        a, b = pool[ka][:, ia], pool[kb][:, ib]
        out.append(torch.stack([a, a.flip(0), b, b.flip(0)]))
    return torch.stack(out)


def scan_route_attention(y: Tensor, threshold: float = 0.0, eps: float = 1e-5) -> Tensor:
    """MHS-VM's scan-route attention: fuse the outputs of R routes, ``y [..., R, C] -> [..., C]``.

    ``sum_r y_r * relu(cv - threshold)`` with ``cv = std_r(y) / (mean_r(y - min_r y) + eps)`` per
    channel and token (the sample std over the R routes): routes that disagree weigh more.
    """
    spread = torch.std(y, dim=-2)
    level = (y - y.amin(dim=-2, keepdim=True)).mean(dim=-2)
    return y.sum(dim=-2) * F.relu(spread / (level + eps) - threshold)


class MultiHeadRouteSS2D(nn.Module):
    """MHS-VM-style mixer ``[B, H, W, dim] -> [B, H, W, dim]``: ``heads`` channel subspaces, one route each.

    ``in_proj`` (dim -> d_inner [+ z]) -> depthwise conv -> SiLU -> split into ``heads`` groups of
    ``d_inner / heads`` channels -> head h read along route h -> :class:`SelectiveSSM` (heads as its
    K directions, float32) -> written back -> LayerNorm -> ``* SiLU(z)`` when gated -> ``out_proj``.

    Args:
        dim: width.
        heads: number of heads / routes (1..12; 1..3 with ``route_fusion="sra"``, MHS-VM's default 3).
        d_state, ssm_ratio, dt_rank, d_conv, conv_bias, gate: as :class:`SS2D`; ``int(ssm_ratio*dim)``
            is rounded down to a multiple of ``heads``.
        route_fusion: ``"single"`` (one route per head) or ``"sra"`` (MHS-VM: per head a route pair
            and the reverses, four scans with their own SSM parameters, fused by
            :func:`scan_route_attention`).
        sra_threshold: the attention's ``t`` (MHS-VM: 0).
    """

    def __init__(
        self,
        dim: int,
        *,
        heads: int = 4,
        d_state: int = 16,
        ssm_ratio: float = 2.0,
        dt_rank: int | str = "auto",
        d_conv: int = 3,
        conv_bias: bool = True,
        gate: bool = True,
        route_fusion: str = "single",
        sra_threshold: float = 0.0,
    ):
        super().__init__()
        op = type(self).__name__
        check_positive_int(op, "dim", dim)
        check_positive_int(op, "heads", heads)
        check_choice(op, "route_fusion", route_fusion, ROUTE_FUSIONS)
        limit = MAX_SRA_HEADS if route_fusion == "sra" else MAX_HEADS
        if heads > limit:
            raise ValueError(f"{op}: heads must be at most {limit} (routes available for route_fusion={route_fusion!r}), got {heads}")
        if isinstance(sra_threshold, bool) or not isinstance(sra_threshold, (int, float)) or not sra_threshold >= 0:
            raise ValueError(f"{op}: sra_threshold must be a number >= 0, got {sra_threshold!r}")
        head_dim = int(ssm_ratio * dim) // heads
        if head_dim < 1:
            raise ValueError(f"{op}: int(ssm_ratio * dim) = {int(ssm_ratio * dim)} must be >= heads = {heads}")
        self.heads, self.head_dim, self.gate = heads, head_dim, gate
        self.route_fusion, self.sra_threshold = route_fusion, float(sra_threshold)
        self.routes = 4 if route_fusion == "sra" else 1  # scans per head
        self.d_inner = d_inner = heads * head_dim
        self.in_proj = nn.Linear(dim, d_inner * (2 if gate else 1), bias=False)
        self.conv2d = nn.Conv2d(d_inner, d_inner, d_conv, padding=d_conv // 2, groups=d_inner, bias=conv_bias) if d_conv else None
        self.ssm = SelectiveSSM(head_dim, d_state, heads * self.routes, dt_rank=dt_rank, dt_rank_base=dim)
        self.out_norm = nn.LayerNorm(d_inner)
        self.out_proj = nn.Linear(d_inner, dim, bias=False)
        self._index: dict[tuple, tuple[Tensor, Tensor]] = {}

    def _flat_index(self, H: int, W: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """(gather index ``[heads * routes, H*W]`` into the ``[L * heads]`` (token, head) axis,
        ``route[j] * heads + h``; ``[H*W, heads * routes]``: where grid token ``i`` sits in each scan)."""
        key = (H, W, str(device))
        if key not in self._index:
            if self.route_fusion == "sra":
                routes = sra_route_orders(H, W, self.heads, device).reshape(self.heads * 4, H * W)
            else:
                routes = route_orders(H, W, self.heads, device)
            head = torch.arange(self.heads, device=device).repeat_interleave(self.routes)[:, None]
            self._index[key] = (routes * self.heads + head, routes.argsort(dim=1).T.contiguous())
        return self._index[key]

    def forward(self, x: Tensor) -> Tensor:
        """``x [B, H, W, dim]`` -> ``[B, H, W, dim]``."""
        if x.dim() != 4:
            raise ValueError(f"{type(self).__name__}: x must be [B, H, W, C] (channel-last), got shape {tuple(x.shape)}")
        B, H, W, _ = x.shape
        L = H * W
        xz = self.in_proj(x)
        xs, z = xz.chunk(2, dim=-1) if self.gate else (xz, None)
        if self.conv2d is not None:
            xs = self.conv2d(xs.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        xs = F.silu(xs).reshape(B, L * self.heads, self.head_dim).contiguous()
        index, inverse = self._flat_index(H, W, x.device)
        y = self.ssm(mk.gather_tokens(xs, index))  # [B, L, heads * routes, head_dim]
        if self.route_fusion == "sra":  # back to grid order per scan, then attention over each head's 4 scans
            y = torch.gather(y, 1, inverse[None, :, :, None].expand(B, L, -1, self.head_dim))
            y = scan_route_attention(y.reshape(B, L, self.heads, 4, self.head_dim), self.sra_threshold)
            y = y.reshape(B, L, self.d_inner)
        else:
            y = mk.scatter_tokens(y, index, L * self.heads).reshape(B, L, self.d_inner)
        y = self.out_norm(y)
        if z is not None:
            y = y * F.silu(z.reshape(B, L, self.d_inner))
        return self.out_proj(y).reshape(B, H, W, -1)


def _mixer(dim: int, route: str, mhs: dict, ss2d: dict) -> nn.Module:
    if route == "mhs":
        return MultiHeadRouteSS2D(dim, **mhs, **ss2d)
    return SS2D(dim, **ss2d)


# ---- decoder pieces (channel-last [B, H, W, C] unless noted) ------------------------------------------
class PatchExpand(nn.Module):
    """Swin-UNet/VM-UNet patch expanding: Linear(dim -> scale^2 * out) -> pixel shuffle -> LN.
    ``[B, H, W, dim] -> [B, scale*H, scale*W, out]``."""

    def __init__(self, dim: int, out: int, scale: int = 2):
        super().__init__()
        self.scale = scale
        self.expand = nn.Linear(dim, scale * scale * out, bias=False)
        self.norm = nn.LayerNorm(out)

    def forward(self, x: Tensor) -> Tensor:
        y = F.pixel_shuffle(self.expand(x).permute(0, 3, 1, 2), self.scale)
        return self.norm(y.permute(0, 2, 3, 1))


class LKPE(nn.Module):
    """MSVM-UNet large-kernel patch expanding: 1x1 conv (dim -> scale^2 * out) -> 3x3 depthwise conv
    -> pixel shuffle -> LN. ``[B, H, W, dim] -> [B, scale*H, scale*W, out]``.

    With ``scale=2, out=dim/2`` the 1x1 conv gives 2*dim channels (LKPE); with ``scale=4, out=dim``
    it gives 16*dim (FLKPE).
    """

    def __init__(self, dim: int, out: int, scale: int = 2):
        super().__init__()
        hidden = scale * scale * out
        self.scale = scale
        self.proj = nn.Conv2d(dim, hidden, 1, bias=False)
        self.dw = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False)
        self.norm = nn.LayerNorm(out)

    def forward(self, x: Tensor) -> Tensor:
        y = F.pixel_shuffle(self.dw(self.proj(x.permute(0, 3, 1, 2))), self.scale)
        return self.norm(y.permute(0, 2, 3, 1))


class MultiScaleMlp(nn.Module):
    """MS-VSS MLP: fc1 -> sum of depthwise convs (kernels ``kernels``) -> GELU -> fc2. ``[B, H, W, dim]``."""

    def __init__(self, dim: int, hidden: int, kernels: Sequence[int] = (1, 3, 5)):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.convs = nn.ModuleList(nn.Conv2d(hidden, hidden, k, padding=k // 2, groups=hidden) for k in kernels)
        self.act = nn.GELU()

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc1(x).permute(0, 3, 1, 2)
        h = sum(conv(h) for conv in self.convs)
        return self.fc2(self.act(h.permute(0, 2, 3, 1)))


class MSVSSBlock(nn.Module):
    """``x + DropPath(mixer(LN x))``, then ``x + DropPath(MultiScaleMlp(LN x))``; ``[B, H, W, C]``."""

    def __init__(self, dim: int, mixer: nn.Module, *, mlp_ratio: float = 4.0, drop_path: float = 0.0):
        super().__init__()
        self.norm, self.op = nn.LayerNorm(dim), mixer
        self.norm2, self.mlp = nn.LayerNorm(dim), MultiScaleMlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.op(self.norm(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


# ---- networks ---------------------------------------------------------------------------------------
class _VMambaUNet(nn.Module):
    """Shared body: zoo VMamba encoder, decoder stages from the deepest level up, final 4x expansion."""

    variant: dict = V0
    msvm = False

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        out_channels: int = 2,
        dims: int | Sequence[int] = 96,
        depths: Sequence[int] = (2, 2, 2, 2),
        decoder_depths: Sequence[int] = (2, 2, 2, 1),
        d_state: int = 16,
        ssm_ratio: float = 2.0,
        mlp_ratio: float | None = None,
        route: str = "cross4",
        heads: int = 4,
        drop_path_rate: float = 0.0,
        route_fusion: str = "single",
    ):
        super().__init__()
        op = type(self).__name__
        if spatial_dims != 2:
            raise ValueError(f"{op}: spatial_dims must be 2 (a VMamba 2D network), got {spatial_dims!r}")
        check_positive_int(op, "in_channels", in_channels)
        check_positive_int(op, "out_channels", out_channels)
        check_choice(op, "route", route, ROUTES)
        check_positive_int(op, "heads", heads)
        check_choice(op, "route_fusion", route_fusion, ROUTE_FUSIONS)
        if route_fusion != "single" and route != "mhs":
            raise ValueError(f"{op}: route_fusion={route_fusion!r} needs route='mhs', got route={route!r}")
        mhs = dict(heads=heads, route_fusion=route_fusion)
        decoder_depths = tuple(decoder_depths)
        if len(decoder_depths) != 4 or any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in decoder_depths):
            raise ValueError(f"{op}: decoder_depths must be 4 ints >= 0 (deepest level first), got {decoder_depths!r}")
        dims = stage_dims(dims, 4)
        cfg = dict(self.variant, d_state=d_state, ssm_ratio=ssm_ratio)
        if mlp_ratio is not None:
            cfg["mlp_ratio"] = mlp_ratio
        self.in_channels, self.out_channels, self.route = in_channels, out_channels, route
        self.input_multiple = 32
        self.encoder = VMamba(in_chans=in_channels, dims=dims, depths=tuple(depths), drop_path_rate=drop_path_rate, **cfg)
        ss2d = dict(d_state=d_state, ssm_ratio=ssm_ratio, d_conv=3, conv_bias=cfg["conv_bias"], gate=cfg["gate"])
        if route == "mhs":
            for stage in self.encoder.layers:
                for blk in stage.blocks:
                    blk.op = _mixer(blk.norm.normalized_shape[0], route, mhs, ss2d)
                    init_vmamba_weights(blk.op)
        mlp = cfg["mlp_ratio"] if not self.msvm else (cfg["mlp_ratio"] or 4.0)
        self.decoder = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for i, depth in enumerate(decoder_depths):
            level = 3 - i
            dim = dims[level]
            if self.msvm:
                blocks = [MSVSSBlock(dim, _mixer(dim, route, mhs, ss2d), mlp_ratio=mlp) for _ in range(depth)]
            else:
                blocks = [self._vss_block(dim, route, mhs, ss2d, mlp) for _ in range(depth)]
            self.decoder.append(nn.Sequential(*blocks))
            if level > 0:
                up = LKPE if self.msvm else PatchExpand
                self.upsample.append(up(dim, dims[level - 1], 2))
        if self.msvm:
            self.final_expand: nn.Module = LKPE(dims[0], dims[0], 4)  # FLKPE: 1x1 conv to 16*dim
            self.head = nn.Conv2d(dims[0], out_channels, 1)
        else:
            self.final_expand = PatchExpand(dims[0], max(dims[0] // 4, 1), 4)  # VM-UNet: Linear to 4*dim
            self.head = nn.Conv2d(max(dims[0] // 4, 1), out_channels, 1)
        init_vmamba_weights(self.decoder)

    @staticmethod
    def _vss_block(dim: int, route: str, mhs: dict, ss2d: dict, mlp_ratio: float) -> nn.Module:
        blk = VSSBlock(dim, mlp_ratio=mlp_ratio, **ss2d)
        if route == "mhs":
            blk.op = _mixer(dim, route, mhs, ss2d)
        return blk

    def forward(self, x: Tensor) -> Tensor:
        """``x [B, in_channels, H, W]`` (H, W multiples of 32) -> logits ``[B, out_channels, H, W]``."""
        check_model_input(type(self).__name__, x, in_channels=self.in_channels, spatial_dims=2, multiple=32)
        feats = [f.permute(0, 2, 3, 1) for f in self.encoder.forward_stages(x)]  # channel-last, strides 4..32
        y = feats[-1]
        for i, stage in enumerate(self.decoder):
            if i > 0:
                y = self.upsample[i - 1](y) + feats[3 - i]
            y = stage(y)
        y = self.final_expand(y).permute(0, 3, 1, 2)
        return self.head(y)


class VMUNet(_VMambaUNet):
    """VM-UNet-style 2D network ``[B, in_channels, H, W] -> logits [B, out_channels, H, W]``.

    Args:
        spatial_dims: must be 2.
        in_channels, out_channels: input channels (1 allowed); classes including background.
        dims: encoder width of stage 1 (doubled per stage) or 4 widths (VM-UNet: 96).
        depths: encoder blocks per stage (VM-UNet's config: 2, 2, 2, 2).
        decoder_depths: decoder blocks per level, deepest first (VM-UNet's config: 2, 2, 2, 1; with
            dims 96 this gives 27.43M parameters, VM-UNet's reported size).
        d_state, ssm_ratio: SS2D settings (VMamba v0: 16, 2.0).
        mlp_ratio: MLP in each block (None: the layout's default, 0 for v0).
        route: ``"cross4"`` (SS2D, VMamba's 4-way cross scan) or ``"mhs"`` (:class:`MultiHeadRouteSS2D`).
        heads: heads of the ``"mhs"`` route (MHS-VM: 4).
        drop_path_rate: stochastic depth of the encoder.
        route_fusion: with ``route="mhs"``: ``"single"`` (one route per head) or ``"sra"`` (MHS-VM's
            route pairs with scan-route attention; at most 3 heads).

    Examples:
        >>> net = VMUNet(in_channels=1, out_channels=2, dims=16, depths=(1, 1, 1, 1), decoder_depths=(1, 1, 1, 1))
        >>> net(torch.randn(1, 1, 64, 96)).shape
        torch.Size([1, 2, 64, 96])
    """

    variant = V0
    msvm = False


class MSVMUNet(_VMambaUNet):
    """MSVM-UNet-style 2D network: VMamba v2 encoder, MS-VSS decoder, LKPE and FLKPE expansion.

    Arguments as :class:`VMUNet`; defaults follow MSVM-UNet's ``vssm_tiny`` encoder (depths 2, 2, 8, 2,
    d_state 1, ssm_ratio 1.0, MLP 4, no z gate) and 2 MS-VSS blocks per decoder level.
    """

    variant = V2
    msvm = True

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        out_channels: int = 2,
        dims: int | Sequence[int] = 96,
        depths: Sequence[int] = (2, 2, 8, 2),
        decoder_depths: Sequence[int] = (2, 2, 2, 2),
        d_state: int = 1,
        ssm_ratio: float = 1.0,
        mlp_ratio: float | None = None,
        route: str = "cross4",
        heads: int = 4,
        drop_path_rate: float = 0.0,
        route_fusion: str = "single",
    ):
        super().__init__(
            spatial_dims, in_channels, out_channels, dims=dims, depths=depths, decoder_depths=decoder_depths,
            d_state=d_state, ssm_ratio=ssm_ratio, mlp_ratio=mlp_ratio, route=route, heads=heads,
            drop_path_rate=drop_path_rate, route_fusion=route_fusion,
        )


__all__ = ["LKPE", "MSVMUNet", "MultiHeadRouteSS2D", "PatchExpand", "VMUNet", "route_orders", "scan_route_attention",
           "sra_route_orders"]
