"""VideoMamba (OpenGVLab/VideoMamba, arXiv 2403.06977): Vim for video clips ``[B, C, T, H, W]``.

A 3D conv "tubelet" embedding (kernel and stride ``(tubelet_size, 16, 16)``) gives a
``T' x H' x W'`` token grid. Tokens get a learned spatial position embedding (shared by all frames)
plus a learned temporal one (shared by all positions), both interpolated to the clip's grid, and
are ordered spatial-first (frame by frame, row-major inside a frame) with one class token at the
HEAD of the sequence. Then Vim blocks ("Add -> RMSNorm -> bidirectional Mamba mixer", float32
residual; VideoMamba sums the two directions), a final RMSNorm, and a classifier on the class
token. ShuffleMamba's layer-wise token shuffle is available as ``shuffle_prob``.

Examples:
    >>> m = create_backbone("videomamba_test", num_classes=5)
    >>> m(torch.randn(2, 3, 16, 32, 48)).shape               # torch.Size([2, 5])
    >>> m.forward_intermediates(torch.randn(1, 3, 16, 32, 48))[0].shape  # [1, 32, 8, 2, 3]
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from mz_kernels._validate import check_choice, check_positive_int

from .._contract import Backbone
from .._registry import register_backbone
from ..layers.common import resample_pos_embed
from ..layers.vim_block import VimBlock, run_prenorm_layers, shuffle_probs
from .vim import _pair, map_bimamba_mixer, tap_indices, vim_mixer


class VideoMamba(Backbone):
    """VideoMamba: tubelet embedding, spatial + temporal position embeddings, head class token, Vim blocks.

    Args:
        img_size: frame size the spatial position embedding is built for.
        num_frames: clip length (in frames) the temporal position embedding is built for.
        patch_size: spatial patch (= spatial stride).
        tubelet_size: temporal patch (= temporal stride).
        in_chans, num_classes: input channels, classifier outputs (0: none).
        embed_dim, depth: width and number of blocks.
        d_state, expand, d_conv: Mamba mixer hyper-parameters.
        merge: ``"sum"`` (VideoMamba) or ``"mean"`` (Vim's ``div2``) of the two scan directions.
        drop_rate: dropout after the embeddings and before the head.
        drop_path_rate: stochastic depth, rising linearly over the blocks.
        shuffle_prob: ShuffleMamba's maximum layer-wise shuffle probability (0 disables).
        residual_in_fp32: keep the residual stream in float32.
        norm_eps: RMSNorm epsilon.
    """

    def __init__(
        self,
        *,
        img_size: int | Sequence[int] = 224,
        num_frames: int = 8,
        patch_size: int = 16,
        tubelet_size: int = 1,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 192,
        depth: int = 24,
        d_state: int = 16,
        expand: float = 2.0,
        d_conv: int = 4,
        merge: str = "sum",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        shuffle_prob: float = 0.0,
        residual_in_fp32: bool = True,
        norm_eps: float = 1e-5,
    ):
        name = type(self).__name__
        patch_size = check_positive_int(name, "patch_size", patch_size)
        tubelet_size = check_positive_int(name, "tubelet_size", tubelet_size)
        stride = (tubelet_size, patch_size, patch_size)
        super().__init__(spatial_dims=3, in_chans=in_chans, num_classes=num_classes, input_multiple=stride)
        embed_dim = check_positive_int(name, "embed_dim", embed_dim)
        depth = check_positive_int(name, "depth", depth)
        num_frames = check_positive_int(name, "num_frames", num_frames)
        check_choice(name, "merge", merge, ("mean", "sum"))
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"{name}: drop_path_rate must be in [0, 1), got {drop_path_rate!r}")
        img = _pair(img_size, "img_size", name)
        if any(s % patch_size for s in img) or num_frames % tubelet_size:
            raise ValueError(
                f"{name}: img_size {img} / num_frames {num_frames} must be multiples of "
                f"patch_size {patch_size} / tubelet_size {tubelet_size}"
            )
        self.embed_dim, self.depth, self.residual_in_fp32 = embed_dim, depth, residual_in_fp32
        self.pos_grid = (img[0] // patch_size, img[1] // patch_size)
        self.time_grid = (num_frames // tubelet_size,)
        self.taps = tap_indices(depth, name)
        self.shuffle_probs = shuffle_probs(depth, shuffle_prob)

        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=stride, stride=stride)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.cls_pos_embed = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, math.prod(self.pos_grid), embed_dim))
        self.temporal_pos_embed = nn.Parameter(torch.zeros(1, self.time_grid[0], embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        mixer = partial(vim_mixer, merge=merge, d_state=d_state, expand=expand, d_conv=d_conv)
        self.blocks = nn.ModuleList(
            VimBlock(embed_dim, mixer(i, embed_dim), drop_path=dpr[i], norm_eps=norm_eps) for i in range(depth)
        )
        self.norm = nn.RMSNorm(embed_dim, eps=norm_eps)
        self.head_drop = nn.Dropout(drop_rate)
        self.num_features = embed_dim
        self.feature_info = [
            dict(num_chs=embed_dim, reduction=stride, module=f"blocks.{i}") for i in self.taps
        ]
        self.reset_classifier(num_classes)
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        for p in (self.cls_token, self.cls_pos_embed, self.pos_embed):
            nn.init.trunc_normal_(p, std=0.02)
        for blk in self.blocks:
            nn.init.kaiming_uniform_(blk.mixer.out_proj.weight, a=math.sqrt(5))
            blk.mixer.out_proj.weight.div_(math.sqrt(self.depth))

    def embed(self, x: Tensor) -> tuple[Tensor, tuple[int, int, int]]:
        """``[B, C, T, H, W]`` -> tokens ``[B, 1 + T'*H'*W', D]`` (class token first, then frame by frame)."""
        x = self.patch_embed.proj(x)  # [B, D, T', H', W']
        B, D, T, H, W = x.shape
        t = x.permute(0, 2, 3, 4, 1).reshape(B, T, H * W, D)
        t = t + resample_pos_embed(self.pos_embed, (H, W), self.pos_grid)[:, None]
        t = t + resample_pos_embed(self.temporal_pos_embed, (T,), self.time_grid)[:, :, None]
        cls = (self.cls_token + self.cls_pos_embed).expand(B, -1, -1).to(t.dtype)
        return self.pos_drop(torch.cat([cls, t.reshape(B, T * H * W, D)], dim=1)), (T, H, W)

    def _run(self, x: Tensor, taps: Sequence[int]) -> tuple[list[Tensor], Tensor, tuple[int, int, int]]:
        t, grid = self.embed(x)
        shuffle = self.shuffle_probs if self.training and max(self.shuffle_probs) > 0 else None
        outs, final = run_prenorm_layers(
            self.blocks, t, (t.shape[1],), run_block=self.run_block, taps=taps, shuffle=shuffle,
            residual_in_fp32=self.residual_in_fp32,
        )
        return outs, final, grid

    def forward_stages(self, x: Tensor) -> list[Tensor]:
        """Feature maps ``[B, embed_dim, T/tubelet, H/16, W/16]`` of the residual stream after the 4 tap blocks."""
        outs, _, grid = self._run(x, self.taps)
        return [o[:, 1:].transpose(1, 2).reshape(x.shape[0], self.embed_dim, *grid) for o in outs]

    def forward_features(self, x: Tensor) -> Tensor:
        """``[B, C, T, H, W]`` -> normalised tokens ``[B, 1 + N, embed_dim]`` (class token first)."""
        self.check_input(x)
        _, final, _ = self._run(x, ())
        return self.norm(final.to(self.norm.weight.dtype))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Class token -> classifier."""
        pooled = self.head_drop(x[:, 0])
        return pooled if pre_logits else self.head(pooled)

    def checkpoint_filter_fn(self, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """Map an official OpenGVLab/VideoMamba checkpoint (``layers.{i}.mixer.*_b``, ``norm_f``,
        ``pos_embed`` with the class row first, ``temporal_pos_embedding``) onto this model."""
        if not any(k.startswith("layers.") for k in state_dict):
            return state_dict
        sd = dict(state_dict)
        out: dict[str, Tensor] = {}
        for i in range(self.depth):
            map_bimamba_mixer(sd, out, f"layers.{i}.mixer", f"blocks.{i}.mixer")
        if "pos_embed" in sd:
            pos = sd.pop("pos_embed")
            out["cls_pos_embed"], grid = pos[:, :1], pos[:, 1:]
            side = math.isqrt(grid.shape[1])
            if side * side != grid.shape[1]:
                raise ValueError(f"{type(self).__name__}: checkpoint pos_embed has {grid.shape[1]} patch rows, not a square grid")
            out["pos_embed"] = resample_pos_embed(grid, self.pos_grid, (side, side))
        if "temporal_pos_embedding" in sd:
            tpos = sd.pop("temporal_pos_embedding")
            out["temporal_pos_embed"] = resample_pos_embed(tpos, self.time_grid, (tpos.shape[1],))
        for k, v in sd.items():
            k = k.replace("layers.", "blocks.", 1) if k.startswith("layers.") else k
            out["norm." + k[len("norm_f.") :] if k.startswith("norm_f.") else k] = v
        return out


def _create(defaults: dict[str, Any], kwargs: dict[str, Any]) -> VideoMamba:
    return VideoMamba(**{**defaults, **kwargs})


@register_backbone
def videomamba_tiny(**kwargs: Any) -> VideoMamba:
    """VideoMamba-Ti: 192 x 24, 7M parameters (IN-1k 76.9, K400 76.9)."""
    return _create(dict(embed_dim=192, depth=24), kwargs)


@register_backbone
def videomamba_small(**kwargs: Any) -> VideoMamba:
    """VideoMamba-S: 384 x 24, 26M parameters (IN-1k 81.2, K400 79.3)."""
    return _create(dict(embed_dim=384, depth=24), kwargs)


@register_backbone
def videomamba_test(**kwargs: Any) -> VideoMamba:
    """A cheap VideoMamba for tests: 32 x 4, tubelet 2, built for 8 x 32 x 32 clips."""
    return _create(dict(embed_dim=32, depth=4, img_size=32, num_frames=8, tubelet_size=2), kwargs)
