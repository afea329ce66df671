"""Vim (hustvl/Vim, "Vision Mamba", ICML'24): a plain, ViT-like bidirectional Mamba.

16x16 conv patch embedding, a learned position embedding (interpolated to any input size that
is a multiple of 16), one class token inserted in the MIDDLE of the token sequence, then ``depth``
blocks "Add -> RMSNorm -> Mamba mixer" with the residual stream in float32. The mixer scans the
sequence forward and backward with per-direction conv1d / x_proj / dt_proj / A / D, averages the
two directions (Vim's ``if_divide_out``), gates with SiLU(z) and projects back; there is no MLP.
Classification reads the normalised class token.

Options: ShuffleMamba's stochastic layer-wise token shuffle (``shuffle_prob``, training only) and
loading of the official Vim checkpoints (``create_backbone("vim_tiny", pretrained=path)``).

Examples:
    >>> from mz_backbones import create_backbone
    >>> m = create_backbone("vim_test", num_classes=10)
    >>> m(torch.randn(2, 3, 64, 96)).shape              # torch.Size([2, 10])
    >>> [f.shape for f in m.forward_intermediates(torch.randn(1, 3, 64, 96))][0]  # [1, 32, 4, 6]
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from mz_kernels._validate import check_choice, check_positive_int

from .._contract import Backbone
from .._registry import register_backbone
from ..layers.common import resample_pos_embed
from ..layers.mixer import MambaMixer
from ..layers.scans import Bidirectional
from ..layers.vim_block import VimBlock, run_prenorm_layers, shuffle_probs

CLS_POSITIONS = ("middle", "head", "none")


def _pair(v: int | Sequence[int], name: str, owner: str) -> tuple[int, int]:
    t = (v, v) if isinstance(v, int) else tuple(v)
    if len(t) != 2 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in t):
        raise ValueError(f"{owner}: {name} must be a positive int or a pair of them, got {v!r}")
    return t  # type: ignore[return-value]


def tap_indices(depth: int, owner: str) -> list[int]:
    """The 4 feature taps of a plain model: after blocks ``depth/4*(i+1) - 1`` (5, 11, 17, 23 at 24)."""
    if depth < 4:
        raise ValueError(f"{owner}: depth must be >= 4 (4 feature taps), got {depth}")
    return [depth * (i + 1) // 4 - 1 for i in range(4)]


def vim_mixer(layer: int, dim: int, *, merge: str = "mean", **kw: Any) -> MambaMixer:
    """Vim's mixer: forward + backward scan, per-direction parameters, ``merge`` of the two."""
    return MambaMixer(dim, Bidirectional(), merge=merge, **kw)


class PlainMamba2d(Backbone):
    """Shared body of the plain 2D models (Vim, LocalVim): patch embed, position embedding, optional
    class token, the Vim layer stack, final RMSNorm, and the pooling head. Subclasses choose the
    mixer (``mixer_factory``) and the grid the mixer sees (:meth:`mixer_grid`).

    Args:
        img_size: the input size the position embedding is built for (other sizes interpolate).
        patch_size: patch (= stride) of the conv patch embedding.
        in_chans, num_classes: input channels, classifier outputs (0: none).
        embed_dim, depth: width and number of blocks.
        d_state, expand, d_conv: Mamba mixer hyper-parameters.
        cls_token: ``"middle"`` (Vim), ``"head"`` or ``"none"`` (mean pooling).
        drop_rate: dropout after the position embedding and before the head.
        drop_path_rate: stochastic depth, rising linearly over the blocks.
        shuffle_prob: ShuffleMamba's maximum layer-wise shuffle probability (0 disables).
        residual_in_fp32: keep the residual stream in float32 (Vim's default).
        norm_eps: RMSNorm epsilon.
        mixer_factory: ``mixer_factory(layer, dim, d_state=, expand=, d_conv=) -> mixer`` (default:
            Vim's bidirectional mixer with the mean merge).
    """

    def __init__(
        self,
        *,
        img_size: int | Sequence[int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 192,
        depth: int = 24,
        d_state: int = 16,
        expand: float = 2.0,
        d_conv: int = 4,
        cls_token: str = "middle",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        shuffle_prob: float = 0.0,
        residual_in_fp32: bool = True,
        norm_eps: float = 1e-5,
        mixer_factory: Callable[..., nn.Module] | None = None,
    ):
        name = type(self).__name__
        patch_size = check_positive_int(name, "patch_size", patch_size)
        super().__init__(spatial_dims=2, in_chans=in_chans, num_classes=num_classes, input_multiple=patch_size)
        embed_dim = check_positive_int(name, "embed_dim", embed_dim)
        depth = check_positive_int(name, "depth", depth)
        check_choice(name, "cls_token", cls_token, CLS_POSITIONS)
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"{name}: drop_path_rate must be in [0, 1), got {drop_path_rate!r}")
        img = _pair(img_size, "img_size", name)
        if any(s % patch_size for s in img):
            raise ValueError(f"{name}: img_size {img} must be a multiple of patch_size {patch_size}")
        self.patch_size, self.embed_dim, self.depth = patch_size, embed_dim, depth
        self.cls_position = cls_token
        self.residual_in_fp32 = residual_in_fp32
        self.pos_grid = (img[0] // patch_size, img[1] // patch_size)
        self.taps = tap_indices(depth, name)
        self.shuffle_probs = shuffle_probs(depth, shuffle_prob)

        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, math.prod(self.pos_grid), embed_dim))
        if cls_token != "none":
            self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
            self.cls_pos_embed = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(
            VimBlock(
                embed_dim,
                (mixer_factory or vim_mixer)(i, embed_dim, d_state=d_state, expand=expand, d_conv=d_conv),
                drop_path=dpr[i],
                norm_eps=norm_eps,
            )
            for i in range(depth)
        )
        self.norm = nn.RMSNorm(embed_dim, eps=norm_eps)
        self.head_drop = nn.Dropout(drop_rate)
        self.num_features = embed_dim
        self.feature_info = [dict(num_chs=embed_dim, reduction=patch_size, module=f"blocks.{i}") for i in self.taps]
        self.reset_classifier(num_classes)
        self._init_weights()

    # ---- hooks --------------------------------------------------------------------------------
    def mixer_grid(self, num_tokens: int, grid: tuple[int, int]) -> tuple[int, ...]:
        """The grid the mixers see: the whole token sequence (class token included) as 1D."""
        return (num_tokens,)

    # ---- init ---------------------------------------------------------------------------------
    @torch.no_grad()
    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_position != "none":
            nn.init.trunc_normal_(self.cls_token, std=0.02)
            nn.init.trunc_normal_(self.cls_pos_embed, std=0.02)
        for blk in self.blocks:
            # GPT-2 style rescale of the projection that writes into the residual stream
            nn.init.kaiming_uniform_(blk.mixer.out_proj.weight, a=math.sqrt(5))
            blk.mixer.out_proj.weight.div_(math.sqrt(self.depth))

    # ---- forward ------------------------------------------------------------------------------
    def cls_index(self, num_patches: int) -> int | None:
        """Where the class token sits in the sequence (``None`` without one)."""
        return {"middle": num_patches // 2, "head": 0, "none": None}[self.cls_position]

    def embed(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """``[B, C, H, W]`` -> tokens ``[B, N (+1), D]`` with position embedding, and the patch grid."""
        x = self.patch_embed.proj(x)
        grid = (x.shape[-2], x.shape[-1])
        t = x.flatten(2).transpose(1, 2) + resample_pos_embed(self.pos_embed, grid, self.pos_grid)
        idx = self.cls_index(t.shape[1])
        if idx is not None:
            cls = (self.cls_token + self.cls_pos_embed).expand(t.shape[0], -1, -1).to(t.dtype)
            t = torch.cat([t[:, :idx], cls, t[:, idx:]], dim=1)
        return self.pos_drop(t), grid

    def _run(self, x: Tensor, taps: Sequence[int]) -> tuple[list[Tensor], Tensor, tuple[int, int]]:
        t, grid = self.embed(x)
        shuffle = self.shuffle_probs if self.training and max(self.shuffle_probs) > 0 else None
        outs, final = run_prenorm_layers(
            self.blocks, t, self.mixer_grid(t.shape[1], grid), run_block=self.run_block, taps=taps,
            shuffle=shuffle, residual_in_fp32=self.residual_in_fp32, consume_input=True,
        )
        return outs, final, grid

    def _drop_cls(self, t: Tensor, grid: tuple[int, int]) -> Tensor:
        idx = self.cls_index(math.prod(grid))
        return t if idx is None else torch.cat([t[:, :idx], t[:, idx + 1 :]], dim=1)

    def forward_stages(self, x: Tensor) -> list[Tensor]:
        """Feature maps ``[B, embed_dim, H/16, W/16]`` of the residual stream after the 4 tap blocks
        (class token removed)."""
        outs, _, grid = self._run(x, self.taps)
        B = x.shape[0]
        return [self._drop_cls(o, grid).transpose(1, 2).reshape(B, self.embed_dim, *grid) for o in outs]

    def forward_features(self, x: Tensor) -> Tensor:
        """``[B, C, H, W]`` -> normalised tokens ``[B, (1 +) N, embed_dim]``, class token (if any) first."""
        self.check_input(x)
        _, final, grid = self._run(x, ())
        t = self.norm(final.to(self.norm.weight.dtype))
        idx = self.cls_index(math.prod(grid))
        if idx is None:
            return t
        return torch.cat([t[:, idx : idx + 1], t[:, :idx], t[:, idx + 1 :]], dim=1)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Class token (or the mean of the tokens without one) -> classifier."""
        pooled = x.mean(dim=1) if self.cls_position == "none" else x[:, 0]
        pooled = self.head_drop(pooled)
        return pooled if pre_logits else self.head(pooled)


class VisionMamba(PlainMamba2d):
    """Vim: :class:`PlainMamba2d` with the middle class token and the bidirectional mixer.

    Args:
        merge: how the two scan directions combine: ``"mean"`` (Vim's ``div2``) or ``"sum"``.
        cls_token: ``"middle"`` (Vim), ``"head"`` or ``"none"``.
        **kwargs: the arguments of :class:`PlainMamba2d` (``img_size``, ``embed_dim``, ``depth``,
            ``shuffle_prob``, ...).
    """

    def __init__(self, *, merge: str = "mean", cls_token: str = "middle", **kwargs: Any):
        check_choice(type(self).__name__, "merge", merge, ("mean", "sum"))
        super().__init__(cls_token=cls_token, mixer_factory=partial(vim_mixer, merge=merge), **kwargs)

    def checkpoint_filter_fn(self, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """Map an official hustvl/Vim checkpoint (``layers.{i}.mixer.conv1d_b``, ``A_b_log``, ``norm_f``,
        ``pos_embed`` with the class row in the middle, ...) onto this model; our own keys pass through."""
        if not any(k.startswith("layers.") for k in state_dict):
            return state_dict
        sd = dict(state_dict)
        out: dict[str, Tensor] = {}
        for i in range(self.depth):
            map_bimamba_mixer(sd, out, f"layers.{i}.mixer", f"blocks.{i}.mixer")
        if "pos_embed" in sd:
            pos = sd.pop("pos_embed")
            idx = self.cls_index(pos.shape[1] - 1)
            if idx is not None:
                out["cls_pos_embed"] = pos[:, idx : idx + 1]
                pos = torch.cat([pos[:, :idx], pos[:, idx + 1 :]], dim=1)
            side = math.isqrt(pos.shape[1])
            if side * side != pos.shape[1]:
                raise ValueError(f"{type(self).__name__}: checkpoint pos_embed has {pos.shape[1]} patch rows, not a square grid")
            out["pos_embed"] = resample_pos_embed(pos, self.pos_grid, (side, side))
        for k, v in sd.items():  # the rest keeps its name up to the module renames
            k = k.replace("layers.", "blocks.", 1) if k.startswith("layers.") else k
            out["norm." + k[len("norm_f.") :] if k.startswith("norm_f.") else k] = v
        return out


def map_bimamba_mixer(sd: dict[str, Tensor], out: dict[str, Tensor], src: str, dst: str) -> None:
    """Move one official Vim/VideoMamba bidirectional mixer (``src`` prefix, forward params plus
    ``*_b`` backward params) from ``sd`` into ``out`` under our layout (``dst`` prefix): the two
    directions stacked on a leading ``K=2`` axis (``conv_weight`` ``[2*d_inner, d_conv]``)."""
    if f"{src}.in_proj.weight" not in sd:
        return

    def take(name: str) -> Tensor:
        key = f"{src}.{name}"
        if key not in sd:
            raise ValueError(f"checkpoint is missing {key!r} (an official bidirectional Mamba mixer needs it)")
        return sd.pop(key)

    out[f"{dst}.in_proj.weight"] = take("in_proj.weight")
    out[f"{dst}.out_proj.weight"] = take("out_proj.weight")
    out[f"{dst}.conv_weight"] = torch.cat([take("conv1d.weight").flatten(1), take("conv1d_b.weight").flatten(1)])
    if f"{src}.conv1d.bias" in sd:
        out[f"{dst}.conv_bias"] = torch.cat([take("conv1d.bias"), take("conv1d_b.bias")])
    out[f"{dst}.ssm.x_proj_weight"] = torch.stack([take("x_proj.weight"), take("x_proj_b.weight")])
    out[f"{dst}.ssm.dt_proj_weight"] = torch.stack([take("dt_proj.weight"), take("dt_proj_b.weight")])
    out[f"{dst}.ssm.dt_bias"] = torch.stack([take("dt_proj.bias"), take("dt_proj_b.bias")])
    out[f"{dst}.ssm.A_log"] = torch.stack([take("A_log"), take("A_b_log")])
    out[f"{dst}.ssm.D"] = torch.stack([take("D"), take("D_b")])


def _create(defaults: dict[str, Any], kwargs: dict[str, Any]) -> VisionMamba:
    return VisionMamba(**{**defaults, **kwargs})


@register_backbone
def vim_tiny(**kwargs: Any) -> VisionMamba:
    """Vim-Ti: 192 x 24, 7M parameters (IN-1k 76.1)."""
    return _create(dict(embed_dim=192, depth=24), kwargs)


@register_backbone
def vim_small(**kwargs: Any) -> VisionMamba:
    """Vim-S: 384 x 24, 26M parameters (IN-1k 80.5)."""
    return _create(dict(embed_dim=384, depth=24), kwargs)


@register_backbone
def vim_test(**kwargs: Any) -> VisionMamba:
    """A cheap Vim for tests: 32 x 4, built for 64 x 64 inputs."""
    return _create(dict(embed_dim=32, depth=4, img_size=64), kwargs)
