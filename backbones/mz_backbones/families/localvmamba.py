"""LocalVMamba (hunto/LocalMamba, arXiv 2403.09338): VMamba v0 with searched local scans.

Each block's SS2D scans its grid in 4 directions picked per layer by LocalMamba's search from
global row / column scans and windowed (w x w) scans, each possibly reversed
(:class:`~mz_backbones.layers.scans.Local2D`). Every direction's output is gated by a channel
attention before the directions are summed. Everything else is VMamba v0: 4x4 patchify stem,
patch merging, gated SS2D with d_state 16 and ssm_ratio 2.0, no MLP.
"""
from __future__ import annotations

import re
from collections.abc import Sequence

from .._registry import register_backbone
from ..layers.scans import Local2D
from .vmamba import VMamba

LocalDirection = tuple[int | None, bool, bool]


def parse_direction(name: str) -> LocalDirection:
    """LocalMamba direction name -> ``(window, column_first, flip)`` for :class:`Local2D`.

    ``h`` row-major, ``v`` column-major, ``w<k>`` k x k windows (row-major); ``_flip`` reverses.

    Examples:
        >>> parse_direction("v_flip"), parse_direction("w7")
        ((None, True, True), (7, False, False))
    """
    m = re.fullmatch(r"(h|v|w([1-9]\d*))(_flip)?", name) if isinstance(name, str) else None
    if m is None:
        raise ValueError(f"parse_direction: direction must be 'h', 'v' or 'w<k>', optionally with '_flip', got {name!r}")
    window = int(m[2]) if m[2] else None
    return window, m[1] == "v", m[3] is not None


def local_scans(directions: Sequence[str]) -> list[Local2D]:
    """One :class:`Local2D` per block from space-separated direction names (``"h h_flip w7 w7_flip"``)."""
    return [Local2D([parse_direction(d) for d in layer.split()]) for layer in directions]


# The searched direction sets of the released models (LocalMamba ``local_vssm_tiny`` / ``_small``), one
# entry per block in order.
TINY_DIRECTIONS = (
    "h h_flip w7 w7_flip", "h_flip v_flip w2 w2_flip", "h_flip v_flip w2_flip w7", "h_flip v v_flip w2",
    "h h_flip v_flip w2_flip", "h_flip v_flip w2 w2_flip", "h w2_flip w7 w7_flip", "h h_flip v v_flip",
    "h v_flip w7 w7_flip", "h_flip v w2 w7_flip", "v v_flip w2 w7_flip", "h h_flip v_flip w2_flip",
    "v_flip w2_flip w7 w7_flip", "h_flip v_flip w2_flip w7_flip", "h_flip v w7 w7_flip",
)
SMALL_DIRECTIONS = (
    "h v v_flip w7_flip", "h h_flip v w7", "h_flip v v_flip w7", "h_flip v w2_flip w7", "h_flip v w2_flip w7",
    "h_flip v_flip w2 w7_flip", "h_flip v v_flip w7", "h v v_flip w7", "h v v_flip w7", "h v v_flip w7_flip",
    "h h_flip v v_flip", "h v v_flip w2", "v v_flip w2_flip w7", "h h_flip v w2", "h_flip v v_flip w7_flip",
    "h h_flip v v_flip", "h v v_flip w7_flip", "h v v_flip w7_flip", "h h_flip v_flip w7",
    "h_flip v_flip w2_flip w7", "h_flip v v_flip w7_flip", "v v_flip w7 w7_flip", "h v v_flip w7_flip",
    "h_flip v v_flip w2", "h v v_flip w2_flip", "h h_flip v w7", "h h_flip w7 w7_flip", "h v_flip w2 w2_flip",
    "h v_flip w2 w7", "h v v_flip w7_flip", "h_flip v w2_flip w7", "h_flip v_flip w7 w7_flip", "h v w7 w7_flip",
)

V0_LOCAL = dict(stem="patch", downsample="merge", d_state=16, ssm_ratio=2.0, gate=True, conv_bias=True,
                mlp_ratio=0.0, direction_attn=True)


def _create(cfg: dict, directions: Sequence[str], kwargs: dict) -> VMamba:
    if "scans" not in kwargs:
        kwargs = dict(kwargs, scans=local_scans(directions))
    return VMamba(**{**cfg, **kwargs})


@register_backbone
def localvmamba_tiny(**kwargs) -> VMamba:
    """LocalVMamba-T: VMamba v0 tiny (2-2-9-2, dim 96) with searched local scans (26M; IN-1k 82.7)."""
    return _create(dict(V0_LOCAL, depths=(2, 2, 9, 2), dims=96, drop_path_rate=0.2), TINY_DIRECTIONS, kwargs)


@register_backbone
def localvmamba_small(**kwargs) -> VMamba:
    """LocalVMamba-S: VMamba v0 small (2-2-27-2, dim 96) with searched local scans (50M; IN-1k 83.7)."""
    return _create(dict(V0_LOCAL, depths=(2, 2, 27, 2), dims=96, drop_path_rate=0.2), SMALL_DIRECTIONS, kwargs)


@register_backbone
def localvmamba_test(**kwargs) -> VMamba:
    """Cheap LocalVMamba for tests: 1-1-2-1, dims 16-32-64-128, windowed and global directions."""
    dirs = ("h w2 w2_flip v_flip", "h_flip v w2 w3_flip", "h v_flip w2_flip w3", "v h_flip w2 w2_flip", "h v w2 w2_flip")
    return _create(dict(V0_LOCAL, depths=(1, 1, 2, 1), dims=16), dirs, kwargs)
