"""VMamba (MzeroMiko/VMamba, NeurIPS'24): hierarchical 4-stage backbone of VSS blocks with the SS2D
cross-scan mixer.

Two published layouts, chosen by keyword arguments:

- v0 ("vanilla"): 4x4 patchify stem + LN, 2x2 patch-merging downsampling, VSS blocks without MLP,
  gated SS2D with d_state 16 and ssm_ratio 2.0 (``stem="patch", downsample="merge", mlp_ratio=0``).
- v2: stem of two 3x3 stride-2 convs (LN + GELU between), 3x3 stride-2 conv + LN downsampling,
  blocks ``x + DropPath(SS2D(LN x))`` then ``x + DropPath(MLP(LN x))``, d_state 1, no z gate
  (``stem="conv", downsample="conv", gate=False``).

Feature levels are at strides 4, 8, 16, 32, each passed through its own LayerNorm (VMamba's
``Backbone_VSSM`` ``outnorm{i}``); the last one is the classifier's norm. Official classification
checkpoints (v0 and v2 key layouts) and ``Backbone_VSSM`` checkpoints load through
:meth:`VMamba.checkpoint_filter_fn`.
"""
from __future__ import annotations

import re
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mz_kernels._validate import check_bool, check_choice

from .._contract import Backbone
from .._registry import register_backbone
from ..layers.common import DropPath, Mlp
from ..layers.scans import ScanStrategy
from ..layers.ss2d import SS2D

STEMS = ("patch", "conv")
DOWNSAMPLES = ("merge", "conv")


# ---- stems and downsampling (channel-last outputs [B, H, W, C]) -------------------------------------
class PatchStem(nn.Module):
    """v0 stem: non-overlapping 4x4 patches (conv) + LayerNorm. ``[B, C_in, H, W] -> [B, H/4, W/4, dim]``."""

    def __init__(self, in_chans: int, dim: int, patch_size: int = 4):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class ConvStem(nn.Module):
    """v2 stem: 3x3 s2 conv -> LN -> GELU -> 3x3 s2 conv -> LN. ``[B, C_in, H, W] -> [B, H/4, W/4, dim]``."""

    def __init__(self, in_chans: int, dim: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, dim // 2, 3, stride=2, padding=1)
        self.norm1 = nn.LayerNorm(dim // 2)
        self.conv2 = nn.Conv2d(dim // 2, dim, 3, stride=2, padding=1)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        x = F.gelu(self.norm1(self.conv1(x).permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
        return self.norm2(self.conv2(x).permute(0, 2, 3, 1))


class PatchMerging(nn.Module):
    """v0/Swin 2x2 patch merging: concat the 4 neighbours -> LN -> Linear. ``[B, H, W, C] -> [B, H/2, W/2, out]``."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, out_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        H, W = x.shape[1:3]
        if H % 2 or W % 2:
            x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x))


class ConvDownsample(nn.Module):
    """v2 downsampling: 3x3 stride-2 conv + LN. ``[B, H, W, C] -> [B, H/2, W/2, out]``."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.conv = nn.Conv2d(dim, out_dim, 3, stride=2, padding=1)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))


# ---- block and stage ------------------------------------------------------------------------------
class VSSBlock(nn.Module):
    """``x + DropPath(SS2D(LN x))``, then ``x + DropPath(MLP(LN x))`` when ``mlp_ratio > 0``; ``[B, H, W, C]``."""

    def __init__(self, dim: int, *, mlp_ratio: float = 4.0, drop_path: float = 0.0, **ss2d_kwargs):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.op = SS2D(dim, **ss2d_kwargs)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim) if mlp_ratio > 0 else None
        self.mlp = Mlp(dim, int(dim * mlp_ratio)) if mlp_ratio > 0 else None

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.op(self.norm(x)))
        if self.mlp is not None:
            x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x


class VSSStage(nn.Module):
    """``blocks`` at one resolution, then ``downsample`` (Identity for the last stage)."""

    def __init__(self, blocks: Sequence[nn.Module], downsample: nn.Module):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.downsample = downsample


def stage_dims(dims: int | Sequence[int], num_stages: int) -> tuple[int, ...]:
    """``96 -> (96, 192, 384, 768)``; a sequence is checked and returned as a tuple."""
    if isinstance(dims, int) and not isinstance(dims, bool):
        return tuple(dims * 2**i for i in range(num_stages))
    out = tuple(dims)
    if len(out) != num_stages or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in out):
        raise ValueError(f"dims must be a positive int or {num_stages} positive ints (one per stage), got {dims!r}")
    return out


def drop_path_rates(drop_path_rate: float, total: int) -> list[float]:
    """Linearly increasing stochastic-depth rates over ``total`` blocks."""
    if not 0.0 <= drop_path_rate < 1.0:
        raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate!r}")
    return [drop_path_rate * i / (total - 1) if total > 1 else 0.0 for i in range(total)]


def init_vmamba_weights(module: nn.Module) -> None:
    """VMamba's init: Linear weights trunc-normal(0.02), biases 0; LayerNorm weight 1, bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


# ---- model ----------------------------------------------------------------------------------------
class VMamba(Backbone):
    """Hierarchical VMamba backbone (2D, strides 4/8/16/32).

    Args:
        depths: blocks per stage.
        dims: stage widths, or the first width (doubled per stage).
        in_chans, num_classes: input channels; classifier outputs (0: pooled features).
        stem: ``"patch"`` (v0, 4x4 patchify + LN) or ``"conv"`` (v2, two 3x3 stride-2 convs).
        downsample: ``"merge"`` (v0, 2x2 patch merging) or ``"conv"`` (v2, 3x3 stride-2 conv + LN).
        d_state, ssm_ratio, dt_rank, d_conv, conv_bias, gate: SS2D settings (see :class:`SS2D`).
        mlp_ratio: MLP width per block (0: no MLP, v0).
        drop_path_rate: stochastic depth, linearly increasing over all blocks.
        scans: one 2D :class:`ScanStrategy` per block (``sum(depths)`` of them; LocalVMamba), or
            None for VMamba's cross scan everywhere.
        direction_attn: per-direction channel attention before the merge (LocalVMamba).
        level_norm_affine: give the out norms of levels 0..n-2 a learned scale and bias, as in
            ``Backbone_VSSM`` (needed to load its ``outnorm{i}``); off by default because a
            classifier never uses them (they would get no gradient). The last level's norm is always
            affine (it is the classifier norm).
        img_size: accepted for a uniform call signature; unused (no position embedding).
    """

    def __init__(
        self,
        *,
        depths: Sequence[int] = (2, 2, 9, 2),
        dims: int | Sequence[int] = 96,
        in_chans: int = 3,
        num_classes: int = 0,
        stem: str = "patch",
        downsample: str = "merge",
        d_state: int = 16,
        ssm_ratio: float = 2.0,
        dt_rank: int | str = "auto",
        d_conv: int = 3,
        conv_bias: bool = True,
        gate: bool = True,
        mlp_ratio: float = 0.0,
        drop_path_rate: float = 0.0,
        scans: Sequence[ScanStrategy] | None = None,
        direction_attn: bool = False,
        level_norm_affine: bool = False,
        img_size: int | Sequence[int] | None = None,
    ):
        super().__init__(spatial_dims=2, in_chans=in_chans, num_classes=num_classes, input_multiple=32)
        name = type(self).__name__
        depths = tuple(depths)
        if len(depths) != 4 or any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in depths):
            raise ValueError(f"{name}: depths must be 4 ints >= 0 (one per stage), got {depths!r}")
        check_choice(name, "stem", stem, STEMS)
        check_choice(name, "downsample", downsample, DOWNSAMPLES)
        check_bool(name, "level_norm_affine", level_norm_affine)
        if isinstance(mlp_ratio, bool) or not isinstance(mlp_ratio, (int, float)) or mlp_ratio < 0:
            raise ValueError(f"{name}: mlp_ratio must be a number >= 0, got {mlp_ratio!r}")
        dims = stage_dims(dims, 4)
        total = sum(depths)
        if scans is not None:
            scans = list(scans)
            if len(scans) != total:
                raise ValueError(f"{name}: scans must hold one ScanStrategy per block ({total}), got {len(scans)}")
        self.stem_kind, self.downsample_kind = stem, downsample
        self.depths, self.dims = depths, dims
        self.level_norm_affine = level_norm_affine

        self.patch_embed = PatchStem(in_chans, dims[0]) if stem == "patch" else ConvStem(in_chans, dims[0])
        dpr = drop_path_rates(drop_path_rate, total)
        down = PatchMerging if downsample == "merge" else ConvDownsample
        ss2d = dict(d_state=d_state, ssm_ratio=ssm_ratio, dt_rank=dt_rank, d_conv=d_conv, conv_bias=conv_bias,
                    gate=gate, direction_attn=direction_attn)
        self.layers = nn.ModuleList()
        k = 0
        for i, (depth, dim) in enumerate(zip(depths, dims)):
            blocks = [
                VSSBlock(dim, mlp_ratio=mlp_ratio, drop_path=dpr[k + j], scan=scans[k + j] if scans else None, **ss2d)
                for j in range(depth)
            ]
            k += depth
            self.layers.append(VSSStage(blocks, down(dim, dims[i + 1]) if i < 3 else nn.Identity()))
        self.out_norms = nn.ModuleList(
            nn.LayerNorm(d, elementwise_affine=level_norm_affine or i == 3) for i, d in enumerate(dims)
        )
        self.feature_info = [dict(num_chs=d, reduction=4 * 2**i, module=f"layers.{i}") for i, d in enumerate(dims)]
        self.num_features = dims[-1]
        self.reset_classifier(num_classes)
        init_vmamba_weights(self)

    def forward_stages(self, x: Tensor) -> list[Tensor]:
        """``[B, C_in, H, W]`` -> 4 maps ``[B, dims[i], H / 2^(i+2), W / 2^(i+2)]``, each layer-normed."""
        x = self.patch_embed(x)
        feats = []
        for stage, norm in zip(self.layers, self.out_norms):
            for blk in stage.blocks:
                x = self.run_block(blk, x)
            feats.append(norm(x).permute(0, 3, 1, 2).contiguous())
            x = stage.downsample(x)
        return feats

    # ---- official checkpoints ---------------------------------------------------------------------
    def checkpoint_filter_fn(self, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """Map an official VMamba checkpoint (classification ``VSSM`` v0/v2 layout, or
        ``Backbone_VSSM`` with ``outnorm{i}``) onto this model; our own state dicts pass unchanged.

        Renames ``patch_embed.{0,2,5,7}`` / ``layers.{i}.downsample.{1,3}`` / ``classifier.{norm,head}``
        / ``outnorm{i}``, moves the SS2D parameters into :class:`SelectiveSSM` (``A_logs [K*C, N] ->
        A_log [K, C, N]``, ``Ds [K*C] -> D [K, C]``, ``dt_projs_* -> dt_proj_weight / dt_bias``) and
        flattens ``Linear2d`` weights ``[out, in, 1, 1]`` to ``[out, in]``. Level norms the checkpoint
        lacks (a classification checkpoint has only the last) keep their current values.
        """
        if not any(k.endswith(".A_logs") or k.startswith(("classifier.", "outnorm")) for k in state_dict):
            return state_dict
        name = type(self).__name__
        stem_map = (
            {"0": "proj", "2": "norm"} if self.stem_kind == "patch"
            else {"0": "conv1", "2": "norm1", "5": "conv2", "7": "norm2"}
        )
        own = self.state_dict()
        out: dict[str, Tensor] = {}
        for key, v in state_dict.items():
            k = key
            if m := re.fullmatch(r"patch_embed\.(\d+)\.(weight|bias)", k):
                if m[1] not in stem_map:
                    raise ValueError(f"{name}: checkpoint key {key!r} does not fit the {self.stem_kind!r} stem")
                k = f"patch_embed.{stem_map[m[1]]}.{m[2]}"
            elif m := re.fullmatch(r"(layers\.\d+\.downsample)\.(\d+)\.(weight|bias)", k):
                k = f"{m[1]}.{ {'1': 'conv', '3': 'norm'}.get(m[2], m[2]) }.{m[3]}"
            elif m := re.fullmatch(r"classifier\.(norm|head)\.(weight|bias)", k):
                k = f"out_norms.{len(self.dims) - 1}.{m[2]}" if m[1] == "norm" else f"head.{m[2]}"
            elif m := re.fullmatch(r"outnorm(\d+)\.(weight|bias)", k):
                k = f"out_norms.{m[1]}.{m[2]}"
                if k not in own:
                    raise ValueError(
                        f"{name}: checkpoint has affine {key!r}; build the model with level_norm_affine=True to load it"
                    )
            elif m := re.fullmatch(r"(layers\.\d+\.blocks\.\d+\.op)\.(\w+)", k):
                k = f"{m[1]}.{_SS2D_RENAMES.get(m[2], m[2])}"
            if k in own and v.shape != own[k].shape and v.numel() == own[k].numel() and k.endswith(_RESHAPED):
                v = v.reshape(own[k].shape)  # A_logs [K*C, N], Ds [K*C], Linear2d [out, in, 1, 1]
            out[k] = v
        for k, v in own.items():
            if k.startswith("out_norms.") and k not in out:
                out[k] = v
        return out


_SS2D_RENAMES = {
    "x_proj_weight": "ssm.x_proj_weight",
    "dt_projs_weight": "ssm.dt_proj_weight",
    "dt_projs_bias": "ssm.dt_bias",
    "A_logs": "ssm.A_log",
    "Ds": "ssm.D",
}
_RESHAPED = (".ssm.A_log", ".ssm.D", "proj.weight", "fc1.weight", "fc2.weight")


# ---- registered variants ----------------------------------------------------------------------------
V0 = dict(stem="patch", downsample="merge", d_state=16, ssm_ratio=2.0, gate=True, conv_bias=True, mlp_ratio=0.0)
V2 = dict(stem="conv", downsample="conv", d_state=1, ssm_ratio=1.0, gate=False, conv_bias=False, mlp_ratio=4.0)


def _create(cfg: dict, kwargs: dict) -> VMamba:
    return VMamba(**{**cfg, **kwargs})


@register_backbone
def vanilla_vmamba_tiny(**kwargs) -> VMamba:
    """VMamba v0 tiny: 2-2-9-2, dim 96, gated SS2D d_state 16 (23M; IN-1k 82.2)."""
    return _create(dict(V0, depths=(2, 2, 9, 2), dims=96, drop_path_rate=0.2), kwargs)


@register_backbone
def vanilla_vmamba_small(**kwargs) -> VMamba:
    """VMamba v0 small: 2-2-27-2, dim 96 (44M; IN-1k 83.5)."""
    return _create(dict(V0, depths=(2, 2, 27, 2), dims=96, drop_path_rate=0.3), kwargs)


@register_backbone
def vmamba_tiny_s1l8(**kwargs) -> VMamba:
    """VMamba v2 tiny: 2-2-8-2, dim 96, d_state 1, ssm_ratio 1.0, MLP 4, no z gate (30M; IN-1k 82.6)."""
    return _create(dict(V2, depths=(2, 2, 8, 2), dims=96, drop_path_rate=0.2), kwargs)


@register_backbone
def vmamba_tiny(**kwargs) -> VMamba:
    """The default VMamba tiny: the ``vmamba_tiny_s1l8`` configuration."""
    return _create(dict(V2, depths=(2, 2, 8, 2), dims=96, drop_path_rate=0.2), kwargs)


@register_backbone
def vmamba_small_s2l15(**kwargs) -> VMamba:
    """VMamba v2 small: 2-2-15-2, dim 96, d_state 1, ssm_ratio 2.0 (50M; IN-1k 83.6)."""
    return _create(dict(V2, depths=(2, 2, 15, 2), dims=96, ssm_ratio=2.0, drop_path_rate=0.3), kwargs)


@register_backbone
def vmamba_test(**kwargs) -> VMamba:
    """Cheap v2-layout VMamba for tests: 1-1-2-1, dims 16-32-64-128."""
    return _create(dict(V2, depths=(1, 1, 2, 1), dims=16), kwargs)
