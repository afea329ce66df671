"""nnMamba encoder (Gong et al., ISBI 2025; lhaof/nnMamba ``nnMamba.py``, ``nnMambaSeg``), 3D.

Layout of the released segmentation encoder, kept here:

- stem ``DoubleConv``: ``Conv3d(k=3, s=2) -> BN -> ReLU -> Conv3d(k=3) -> BN -> ReLU`` to ``dims[0]``;
- then one residual stage per further entry of ``dims``: ``depth`` basic blocks (two bias-free 3x3x3
  convs with BN, identity or 1x1x1-conv shortcut); the first block downsamples (stride 2);
- each stage owns ONE MIC block, shared by all its blocks after the first (the release passes the
  same module to them): ``out = conv_bn(x) + bn(conv(x)) ... + MIC(x) + shortcut(x)``;
- MIC: ``1x1x1 conv -> BN -> ReLU -> a``; ``a + CAI(a)``; ``1x1x1 conv -> BN -> ReLU``. CAI runs ONE
  shared-weight Mamba on four versions of the token sequence (original, length-flipped,
  channel-flipped, both), undoes the flips and averages (``/4``, as the release).

Here CAI is a :class:`MambaMixer` over a bidirectional scan with ``share_params=True`` (original and
length-flip in one folded scan; this is exactly ``mamba(x) + flip(mamba(flip(x)))`` because in_proj,
gate and out_proj act per token), run on the batch ``[x, channel_flip(x)]``.

Feature levels: the stem and each stage, strides 2, 4, 8, 16 (for four levels), channels ``dims``.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from mz_kernels._validate import check_positive_int

from .._contract import Backbone
from .._registry import register_backbone
from ..layers.mixer import MambaMixer
from ..layers.scans import Bidirectional


def _int_tuple(op: str, name: str, value: object) -> tuple[int, ...]:
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) == 0:
        raise ValueError(f"{op}: {name} must be a non-empty sequence of positive ints, got {value!r}")
    return tuple(check_positive_int(op, name, v) for v in value)


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, bias: bool = False) -> list[nn.Module]:
    return [nn.Conv3d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=bias), nn.BatchNorm3d(cout)]


class FlipInvariantMamba(nn.Module):
    """CAI: the mean of one shared-weight Mamba over the original, length-flipped, channel-flipped and
    doubly flipped token sequence, each flip undone: ``[B, L, C] -> [B, L, C]``."""

    def __init__(self, dim: int, *, d_state: int = 16, d_conv: int = 4, expand: float = 2.0):
        super().__init__()
        self.mixer = MambaMixer(
            dim, Bidirectional(), d_state=d_state, d_conv=d_conv, expand=expand, merge="mean", share_params=True
        )

    def forward(self, x: Tensor, grid: Sequence[int]) -> Tensor:
        B = x.shape[0]
        y = self.mixer(_with_channel_flip(x), grid)  # [2B, L, C]: rows B.. hold the channel-flipped input
        return (y[:B] + y[B:].flip(-1)) / 2


def _with_channel_flip(x: Tensor) -> Tensor:
    """``[x; x with the channel axis reversed]`` along the batch: ``[B, L, C] -> [2B, L, C]``."""
    return torch.cat([x, x.flip(-1)], dim=0)


class MICBlock(nn.Module):
    """nnMamba's MIC: ``ReLU(BN(conv1(a + CAI(a))))`` with ``a = ReLU(BN(conv1(x)))``; ``[B, C, D, H, W]`` in and out."""

    def __init__(self, dim: int, **mamba_kw):
        super().__init__()
        self.pre = nn.Sequential(*_conv_bn(dim, dim, 1), nn.ReLU())
        self.cai = FlipInvariantMamba(dim, **mamba_kw)
        self.post = nn.Sequential(*_conv_bn(dim, dim, 1), nn.ReLU())

    def forward(self, x: Tensor) -> Tensor:
        a = self.pre(x)
        B, C, *grid = a.shape
        y = self.cai(a.flatten(2).transpose(1, 2), grid).transpose(1, 2).reshape(a.shape)
        return self.post(a + y)


class ResBlock(nn.Module):
    """Basic residual block, optionally with a MIC branch on its input:
    ``ReLU(BN(conv(ReLU(BN(conv(x))))) + MIC(x) + shortcut(x))``."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.body = nn.Sequential(*_conv_bn(cin, cout, 3, stride), nn.ReLU(), *_conv_bn(cout, cout, 3))
        self.shortcut = nn.Sequential(*_conv_bn(cin, cout, 1, stride)) if (stride != 1 or cin != cout) else nn.Identity()
        self.act = nn.ReLU()

    def forward(self, x: Tensor, mic: nn.Module | None = None) -> Tensor:
        out = self.body(x) + self.shortcut(x)
        if mic is not None:
            out = out + mic(x)
        return self.act(out)


class NnMambaStage(nn.Module):
    """``depth`` residual blocks (the first one strided); ``mic`` (None when depth == 1) runs in the others."""

    def __init__(self, cin: int, cout: int, depth: int, **mamba_kw):
        super().__init__()
        self.blocks = nn.ModuleList([ResBlock(cin, cout, stride=2)] + [ResBlock(cout, cout) for _ in range(depth - 1)])
        self.mic = MICBlock(cout, **mamba_kw) if depth > 1 else None


class NnMambaEncoder(Backbone):
    """nnMamba's 3D encoder: ``[B, in_chans, D, H, W]`` -> features ``[B, dims[i], D/2^(i+1), H/2^(i+1), W/2^(i+1)]``.

    Args:
        in_chans: input channels.
        num_classes: classifier outputs on the pooled last feature map (0: none).
        dims: stem channels, then each residual stage's (published: 32, 64, 128, 256).
        depths: basic blocks per residual stage, ``len(dims) - 1`` entries (published: 3, 3, 3); a
            stage with one block has no MIC.
        d_state, d_conv, expand: Mamba hyper-parameters of the MIC (published 16, 4, 2).
        spatial_dims: must be 3.
        img_size, drop_path_rate: accepted for the common creation interface; unused (no position
            embedding; the release has no stochastic depth, so only 0 is accepted).

    Examples:
        >>> m = NnMambaEncoder(dims=(8, 16, 32), depths=(2, 2))
        >>> [f.shape[1:] for f in m.forward_intermediates(torch.randn(1, 1, 16, 32, 24))]
        [torch.Size([8, 8, 16, 12]), torch.Size([16, 4, 8, 6]), torch.Size([32, 2, 4, 3])]
    """

    def __init__(
        self,
        *,
        in_chans: int = 1,
        num_classes: int = 0,
        dims: Sequence[int] = (32, 64, 128, 256),
        depths: Sequence[int] = (3, 3, 3),
        d_state: int = 16,
        d_conv: int = 4,
        expand: float = 2.0,
        spatial_dims: int = 3,
        img_size: int | Sequence[int] | None = None,
        drop_path_rate: float = 0.0,
    ):
        op = type(self).__name__
        if spatial_dims != 3:
            raise ValueError(f"{op}: spatial_dims must be 3 (nnMamba is a volume encoder), got {spatial_dims!r}")
        dims, depths = _int_tuple(op, "dims", dims), _int_tuple(op, "depths", depths)
        if len(depths) != len(dims) - 1:
            raise ValueError(
                f"{op}: depths needs one entry per residual stage, len(dims) - 1 = {len(dims) - 1}, got {len(depths)}"
            )
        if drop_path_rate != 0.0:
            raise ValueError(f"{op}: drop_path_rate must be 0 (nnMamba has no stochastic depth), got {drop_path_rate!r}")
        super().__init__(spatial_dims=3, in_chans=in_chans, num_classes=num_classes, input_multiple=2 ** len(dims))
        self.dims, self.depths = dims, depths
        mamba_kw = dict(d_state=d_state, d_conv=d_conv, expand=expand)
        self.stem = nn.Sequential(
            *_conv_bn(in_chans, dims[0], 3, stride=2, bias=True), nn.ReLU(), *_conv_bn(dims[0], dims[0], 3, bias=True), nn.ReLU()
        )
        self.stages = nn.ModuleList(
            NnMambaStage(cin, cout, depth, **mamba_kw) for cin, cout, depth in zip(dims[:-1], dims[1:], depths)
        )
        self.feature_info = [dict(num_chs=dims[0], reduction=2, module="stem")] + [
            dict(num_chs=d, reduction=2 ** (i + 2), module=f"stages.{i}") for i, d in enumerate(dims[1:])
        ]
        self.num_features = dims[-1]
        self.reset_classifier(num_classes)

    def forward_stages(self, x: Tensor) -> list[Tensor]:
        """``[B, in_chans, D, H, W]`` -> the stem map and one map per residual stage, channel-first."""
        x = self.run_block(self.stem, x)
        feats = [x]
        for stage in self.stages:
            for j, block in enumerate(stage.blocks):
                x = self.run_block(block, x, stage.mic if j > 0 else None)
            feats.append(x)
        return feats


def _create(defaults: dict, kwargs: dict) -> NnMambaEncoder:
    return NnMambaEncoder(**{**defaults, **kwargs})


@register_backbone
def nnmamba_enc_tiny(**kwargs) -> NnMambaEncoder:
    """The published nnMamba encoder (``nnMambaSeg(channels=32, blocks=3)``): dims 32-64-128-256, 3 blocks per stage."""
    return _create(dict(dims=(32, 64, 128, 256), depths=(3, 3, 3)), kwargs)


@register_backbone
def nnmamba_enc_small(**kwargs) -> NnMambaEncoder:
    """A wider nnMamba encoder (our choice, not published): dims 48-96-192-384, 3 blocks per stage."""
    return _create(dict(dims=(48, 96, 192, 384), depths=(3, 3, 3)), kwargs)


@register_backbone
def nnmamba_enc_test(**kwargs) -> NnMambaEncoder:
    """Cheap variant for tests: stem + two stages (stride 8), dims 8-16-32, two blocks each, d_state 4."""
    return _create(dict(dims=(8, 16, 32), depths=(2, 2), d_state=4), kwargs)
