"""LocalVim (hunto/LocalMamba, arXiv 2403.09338): Vim with local (windowed) scans.

The plain Vim body (16x16 patches, learned position embedding, "Add -> RMSNorm -> mixer" blocks
with a float32 residual, final RMSNorm) without a class token: classification mean-pools the
tokens. Each block's mixer scans the 2D token grid in 4 directions picked per layer by
LocalMamba's search from {global row-major ``h``, global column-major ``v``, 2x2 windows ``w2``,
7x7 windows ``w7``} and their reversals (``*_flip``). Each direction has its own conv1d / x_proj /
dt_proj / A / D; every direction's gated output is re-weighted by a channel attention (LocalMamba's
``BiAttn``: LayerNorm -> mean over tokens -> reduce x1/8 -> GELU -> expand -> sigmoid) and the
directions are summed before ``out_proj``.

Not reproduced: the rotary position embedding that LocalMamba adds on top (no parameters; the
searched LocalVim models were trained with it) and the direction search itself.

Examples:
    >>> m = create_backbone("localvim_test", num_classes=10)
    >>> m(torch.randn(2, 3, 64, 96)).shape              # torch.Size([2, 10])
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mz_kernels import causal_conv1d

from .._registry import register_backbone
from ..layers.mixer import MambaMixer
from ..layers.scans import Local2D
from .vim import PlainMamba2d

DIRECTION_NAMES = ("h", "h_flip", "v", "v_flip", "w2", "w2_flip", "w7", "w7_flip")

# LocalMamba's searched direction sets of LocalVim-T/S (20 layers; ``local_vim_tiny``).
SEARCHED_DIRECTIONS: tuple[tuple[str, ...], ...] = (
    ("h", "v_flip", "w7", "w7_flip"),
    ("h_flip", "w2_flip", "w7", "w7_flip"),
    ("h", "h_flip", "v", "w7"),
    ("h", "h_flip", "v", "v_flip"),
    ("h", "h_flip", "v", "v_flip"),
    ("h", "h_flip", "v", "v_flip"),
    ("h_flip", "v", "v_flip", "w7"),
    ("h_flip", "v", "v_flip", "w2_flip"),
    ("h", "h_flip", "v", "v_flip"),
    ("h", "h_flip", "v", "v_flip"),
    ("h", "v", "v_flip", "w2"),
    ("h", "v", "v_flip", "w2_flip"),
    ("h", "h_flip", "v_flip", "w7"),
    ("h_flip", "v", "v_flip", "w2"),
    ("h", "h_flip", "v", "v_flip"),
    ("h", "v", "w2", "w2_flip"),
    ("v", "v_flip", "w2", "w7"),
    ("h", "h_flip", "v", "w2"),
    ("h", "h_flip", "w2_flip", "w7"),
    ("v", "v_flip", "w2", "w2_flip"),
)


def parse_direction(name: str) -> tuple[int | None, bool, bool]:
    """``"h"`` / ``"v_flip"`` / ``"w7"`` ... -> the ``(window, column_first, flip)`` triple of
    :class:`~mz_backbones.layers.scans.Local2D`. Windows ``w<k>`` accept any k >= 1."""
    base, flip = (name[: -len("_flip")], True) if name.endswith("_flip") else (name, False)
    if base == "h":
        return None, False, flip
    if base == "v":
        return None, True, flip
    if base.startswith("w") and base[1:].isdigit() and int(base[1:]) >= 1:
        return int(base[1:]), False, flip
    raise ValueError(f"LocalVim: direction must look like one of {list(DIRECTION_NAMES)} (w<k> for other windows), got {name!r}")


class ChannelAttention(nn.Module):
    """LocalMamba's ``BiAttn`` (channel branch) for K directions at once.

    ``y [B, L', K, C]`` with ``mask [1, L', K, 1]`` (1 on real tokens, 0 on padding) ->
    per-direction channel gates ``[B, K, C]``.
    """

    def __init__(self, channels: int, ratio: float = 0.125):
        super().__init__()
        hidden = max(1, int(channels * ratio))
        self.norm = nn.LayerNorm(channels)
        self.global_reduce = nn.Linear(channels, hidden)
        self.channel_select = nn.Linear(hidden, channels)

    def forward(self, y: Tensor, mask: Tensor) -> Tensor:
        pooled = (self.norm(y) * mask).sum(1) / mask.sum(1)  # [B, K, C], mean over real tokens
        return torch.sigmoid(self.channel_select(F.gelu(self.global_reduce(pooled))))


class LocalMambaMixer(MambaMixer):
    """The LocalVim mixer ``[B, H*W, dim] -> [B, H*W, dim]`` over a :class:`Local2D` scan.

    Args:
        dim: token width.
        directions: the K direction names of this layer (see :func:`parse_direction`).
        d_state, expand, d_conv: Mamba hyper-parameters.
    """

    def __init__(self, dim: int, directions: Sequence[str], *, d_state: int = 16, expand: float = 2.0, d_conv: int = 4):
        if isinstance(directions, str) or len(directions) < 1:
            raise ValueError(f"LocalVim: each layer needs a non-empty list of directions, got {directions!r}")
        scan = Local2D([parse_direction(d) for d in directions])
        super().__init__(dim, scan, d_state=d_state, expand=expand, d_conv=d_conv, merge="sum")
        self.direction_names = tuple(directions)
        self.attn = ChannelAttention(self.d_inner)

    def forward(self, x: Tensor, grid: Sequence[int], pre: Callable[[Tensor], Tensor] | None = None) -> Tensor:
        """``x [B, H*W, dim]`` of the row-major ``grid = (H, W)`` -> ``[B, H*W, dim]`` (``pre``, e.g.
        the block's norm, applied first; window scans do not stream)."""
        if pre is not None:
            x = pre(x)
        B, L, _ = x.shape
        K, C = self.scan.num_dirs, self.d_inner
        xs, z = self.in_proj(x).chunk(2, dim=-1)
        seq = self.scan.scan(xs.contiguous(), grid)  # [B, L', K, C], zero on padding slots
        Lp = seq.shape[1]
        bias = None if self.conv_bias is None else self.conv_bias.to(seq.dtype)
        conv, _ = causal_conv1d(seq.reshape(B, Lp, K * C), self.conv_weight.to(seq.dtype), bias, activation="silu")
        y = self.ssm(conv.reshape(B, Lp, K, C)) * F.silu(self.scan.scan(z.contiguous(), grid))
        mask = self.scan.scan(x.new_ones(1, L, 1), grid)  # [1, L', K, 1]
        gates = self.attn(y, mask)  # [B, K, C]
        return self.out_proj(self.scan.merge(y * gates[:, None], grid))


class LocalVisionMamba(PlainMamba2d):
    """LocalVim: :class:`PlainMamba2d` without a class token and with :class:`LocalMambaMixer`s.

    Args:
        directions: per-layer direction names (``len == depth``); default: LocalMamba's searched
            set (repeated cyclically when ``depth != 20``).
        **kwargs: the arguments of :class:`PlainMamba2d` (``img_size``, ``embed_dim``, ``depth``, ...).
    """

    def __init__(self, *, directions: Sequence[Sequence[str]] | None = None, depth: int = 20, **kwargs: Any):
        if directions is None:
            dirs = [SEARCHED_DIRECTIONS[i % len(SEARCHED_DIRECTIONS)] for i in range(depth)]
        else:
            dirs = [tuple(d) for d in directions]
            if len(dirs) != depth:
                raise ValueError(f"LocalVisionMamba: directions must list {depth} layers (depth), got {len(dirs)}")
        for d in dirs:
            for name in d:
                parse_direction(name)

        def factory(layer: int, dim: int, **kw: Any) -> nn.Module:
            return LocalMambaMixer(dim, dirs[layer], **kw)

        if kwargs.setdefault("cls_token", "none") != "none":
            raise ValueError(
                f"LocalVisionMamba: cls_token must be 'none' (local scans cover the 2D grid only), got {kwargs['cls_token']!r}"
            )
        super().__init__(depth=depth, mixer_factory=factory, **kwargs)
        self.directions = dirs

    def mixer_grid(self, num_tokens: int, grid: tuple[int, int]) -> tuple[int, ...]:
        """LocalVim's mixers see the 2D patch grid (there is no class token)."""
        return grid


def _create(defaults: dict[str, Any], kwargs: dict[str, Any]) -> LocalVisionMamba:
    return LocalVisionMamba(**{**defaults, **kwargs})


@register_backbone
def localvim_tiny(**kwargs: Any) -> LocalVisionMamba:
    """LocalVim-T: 192 x 20, searched directions, 8M parameters (IN-1k 76.2)."""
    return _create(dict(embed_dim=192, depth=20), kwargs)


@register_backbone
def localvim_small(**kwargs: Any) -> LocalVisionMamba:
    """LocalVim-S: 384 x 20, searched directions, 28M parameters (IN-1k 81.2)."""
    return _create(dict(embed_dim=384, depth=20), kwargs)


@register_backbone
def localvim_test(**kwargs: Any) -> LocalVisionMamba:
    """A cheap LocalVim for tests: 32 x 4 with global and 2x2-window directions, for 64 x 64 inputs."""
    dirs = (
        ("h", "v_flip", "w2", "w2_flip"),
        ("h_flip", "v", "w2_flip", "w7"),
        ("h", "h_flip", "v", "v_flip"),
        ("v", "v_flip", "w2", "w7_flip"),
    )
    return _create(dict(embed_dim=32, depth=4, img_size=64, directions=dirs), kwargs)
