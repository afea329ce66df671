"""The 1D bidirectional Mamba sequence encoder (``bimamba_seq_*``) shared by the EEG, audio,
tracking and motion pipelines.

Intended use: any channel-first signal ``[B, in_chans, L]``: EEG windows (``in_chans`` = electrodes,
``L`` = samples, typically ``patch_size=4`` to shorten long recordings), audio features
(``in_chans`` = mel bins, ``L`` = frames), object trajectories (``in_chans`` = box/motion features
per step, ``L`` = steps; ``patch_size=1``) and motion sequences (``in_chans`` = pose features per
frame). It is non-causal (every token sees the whole sequence), so it encodes whole windows; it
is not a streaming model.

Architecture: a 1D patch/stem conv (kernel = stride = ``patch_size``), an optional position
embedding (``"sinusoidal"``, ``"learned"`` (built for ``seq_len`` samples, linearly interpolated
to any length) or ``"none"``), an optional class token at the head of the sequence (off by
default), ``depth`` prenorm residual blocks ``x + DropPath(BiMamba(LN(x)))`` (forward + backward
scan, per-direction parameters, mean merge), each optionally followed by
``x + DropPath(MLP(LN(x)))`` when ``mlp_ratio > 0``, and a final LayerNorm. Classification uses
the class token, or the mean of the tokens without one. ``forward_intermediates`` returns 4 taps
``[B, embed_dim, L / patch_size]``.

Examples:
    >>> m = create_backbone("bimamba_seq_tiny", in_chans=22, patch_size=4, num_classes=4)
    >>> m(torch.randn(8, 22, 1000)).shape                          # torch.Size([8, 4])
    >>> m.forward_intermediates(torch.randn(1, 22, 1000))[-1].shape  # [1, 192, 250]
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from mz_kernels._validate import check_choice, check_positive_int

from .._contract import Backbone
from .._registry import register_backbone
from ..layers.common import DropPath, Mlp, resample_pos_embed
from ..layers.mixer import MambaMixer
from ..layers.scans import Bidirectional
from .vim import tap_indices

POS_EMBEDS = ("sinusoidal", "learned", "none")


def sinusoidal_embedding(length: int, dim: int, *, device: torch.device | None = None) -> Tensor:
    """Transformer sin/cos position table ``[1, length, dim]`` (``dim`` even)."""
    if dim % 2:
        raise ValueError(f"sinusoidal_embedding: dim must be even, got {dim}")
    pos = torch.arange(length, dtype=torch.float32, device=device)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32, device=device) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim, device=device)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq)
    return table[None]


class SeqBlock(nn.Module):
    """``x + DropPath(BiMamba(LN(x)))`` then, when ``mlp_ratio > 0``, ``x + DropPath(MLP(LN(x)))``; ``[B, L, D]``."""

    def __init__(self, dim: int, *, d_state: int, expand: float, d_conv: int, mlp_ratio: float, drop_path: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.mixer = MambaMixer(dim, Bidirectional(), d_state=d_state, expand=expand, d_conv=d_conv, merge="mean")
        self.drop_path = DropPath(drop_path)
        self.mlp = Mlp(dim, int(dim * mlp_ratio)) if mlp_ratio > 0 else None
        self.norm2 = nn.LayerNorm(dim) if mlp_ratio > 0 else None

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.mixer(self.norm1(x), (x.shape[1],)))
        if self.mlp is not None:
            x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x


class SequenceMamba(Backbone):
    """Bidirectional Mamba encoder for ``[B, in_chans, L]`` sequences (L a multiple of ``patch_size``).

    Args:
        in_chans: input channels (EEG electrodes, mel bins, per-step features, ...).
        num_classes: classifier outputs (0: none).
        embed_dim, depth: width and number of blocks (depth >= 4: 4 feature taps).
        patch_size: stem conv kernel and stride (the token stride).
        pos_embed: ``"sinusoidal"``, ``"learned"`` or ``"none"``.
        seq_len: input length (in samples) the learned position embedding is built for.
        cls_token: prepend a class token (used for classification instead of mean pooling).
        d_state, expand, d_conv: Mamba mixer hyper-parameters.
        mlp_ratio: hidden size of the optional per-block MLP (0: no MLP, as in Vim).
        drop_rate: dropout after the embedding and before the head.
        drop_path_rate: stochastic depth, rising linearly over the blocks.
    """

    def __init__(
        self,
        *,
        in_chans: int = 1,
        num_classes: int = 0,
        embed_dim: int = 192,
        depth: int = 12,
        patch_size: int = 1,
        pos_embed: str = "sinusoidal",
        seq_len: int = 1024,
        cls_token: bool = False,
        d_state: int = 16,
        expand: float = 2.0,
        d_conv: int = 4,
        mlp_ratio: float = 0.0,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ):
        name = type(self).__name__
        patch_size = check_positive_int(name, "patch_size", patch_size)
        super().__init__(spatial_dims=1, in_chans=in_chans, num_classes=num_classes, input_multiple=patch_size)
        embed_dim = check_positive_int(name, "embed_dim", embed_dim)
        depth = check_positive_int(name, "depth", depth)
        seq_len = check_positive_int(name, "seq_len", seq_len)
        check_choice(name, "pos_embed", pos_embed, POS_EMBEDS)
        if pos_embed == "sinusoidal" and embed_dim % 2:
            raise ValueError(f"{name}: embed_dim must be even for pos_embed='sinusoidal', got {embed_dim}")
        if pos_embed == "learned" and seq_len % patch_size:
            raise ValueError(f"{name}: seq_len {seq_len} must be a multiple of patch_size {patch_size}")
        if not isinstance(cls_token, bool):
            raise ValueError(f"{name}: cls_token must be a bool, got {cls_token!r}")
        if not (isinstance(mlp_ratio, (int, float)) and mlp_ratio >= 0):
            raise ValueError(f"{name}: mlp_ratio must be a number >= 0, got {mlp_ratio!r}")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"{name}: drop_path_rate must be in [0, 1), got {drop_path_rate!r}")
        self.embed_dim, self.patch_size, self.pos_kind, self.use_cls = embed_dim, patch_size, pos_embed, cls_token
        self.taps = tap_indices(depth, name)
        self.pos_len = seq_len // patch_size

        self.stem = nn.Conv1d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        if pos_embed == "learned":
            self.pos_embed = nn.Parameter(torch.zeros(1, self.pos_len, embed_dim))
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if cls_token:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
            nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(
            SeqBlock(embed_dim, d_state=d_state, expand=expand, d_conv=d_conv, mlp_ratio=mlp_ratio, drop_path=dpr[i])
            for i in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim)
        self.head_drop = nn.Dropout(drop_rate)
        self.num_features = embed_dim
        self.feature_info = [dict(num_chs=embed_dim, reduction=patch_size, module=f"blocks.{i}") for i in self.taps]
        self.reset_classifier(num_classes)

    def embed(self, x: Tensor) -> Tensor:
        """``[B, in_chans, L]`` -> tokens ``[B, (1 +) L / patch_size, embed_dim]`` (class token first)."""
        t = self.stem(x).transpose(1, 2)
        if self.pos_kind == "learned":
            t = t + resample_pos_embed(self.pos_embed, (t.shape[1],), (self.pos_len,))
        elif self.pos_kind == "sinusoidal":
            t = t + sinusoidal_embedding(t.shape[1], self.embed_dim, device=t.device).to(t.dtype)
        if self.use_cls:
            t = torch.cat([self.cls_token.expand(t.shape[0], -1, -1).to(t.dtype), t], dim=1)
        return self.pos_drop(t)

    def _run(self, x: Tensor, taps: list[int]) -> tuple[list[Tensor], Tensor]:
        t = self.embed(x)
        outs = []
        for i, blk in enumerate(self.blocks):
            t = self.run_block(blk, t)
            if i in taps:
                outs.append(t)
        return outs, t

    def forward_stages(self, x: Tensor) -> list[Tensor]:
        """The token stream after the 4 tap blocks, ``[B, embed_dim, L / patch_size]`` each."""
        outs, _ = self._run(x, self.taps)
        skip = 1 if self.use_cls else 0
        return [o[:, skip:].transpose(1, 2) for o in outs]

    def forward_features(self, x: Tensor) -> Tensor:
        """``[B, in_chans, L]`` -> normalised tokens ``[B, (1 +) L / patch_size, embed_dim]``."""
        self.check_input(x)
        return self.norm(self._run(x, [])[1])

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Class token (or the token mean) -> classifier."""
        pooled = self.head_drop(x[:, 0] if self.use_cls else x.mean(dim=1))
        return pooled if pre_logits else self.head(pooled)


def _create(defaults: dict[str, Any], kwargs: dict[str, Any]) -> SequenceMamba:
    return SequenceMamba(**{**defaults, **kwargs})


@register_backbone
def bimamba_seq_tiny(**kwargs: Any) -> SequenceMamba:
    """192 x 12, no MLP (about 3.4M parameters without a head)."""
    return _create(dict(embed_dim=192, depth=12), kwargs)


@register_backbone
def bimamba_seq_small(**kwargs: Any) -> SequenceMamba:
    """384 x 12, no MLP (about 12.6M parameters without a head)."""
    return _create(dict(embed_dim=384, depth=12), kwargs)


@register_backbone
def bimamba_seq_test(**kwargs: Any) -> SequenceMamba:
    """A cheap encoder for tests: 32 x 4, patch 4, learned position embedding for L = 64."""
    return _create(dict(embed_dim=32, depth=4, patch_size=4, pos_embed="learned", seq_len=64), kwargs)
