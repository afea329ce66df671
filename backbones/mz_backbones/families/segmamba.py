"""SegMamba encoder (Xing et al., MICCAI 2024; ge-xing/SegMamba ``model_segmamba/segmamba.py``), 3D.

Layout of the released encoder, kept here:

- stem ``Conv3d(k=7, s=2, p=3)``; between stages ``InstanceNorm -> Conv3d(k=2, s=2)``;
- each stage: one GSC (gated spatial convolution) then ``depth`` TSMamba blocks
  (``x + ToM(LN(x))``, ToM = Mamba mixer over the forward, reverse and inter-slice orders with
  their own conv/SSM parameters, summed before ``out_proj``);
- each stage's feature output is ``MLP(InstanceNorm(x))`` (1x1x1 convs, hidden 2*dim); the next
  stage continues from the un-normalised ``x``, as in the release.

Differences from the release, on purpose:

- the inter-slice order takes its slice count from the actual feature map (the release hard-codes
  ``nslices = 64/32/16/8``, right only for 128^3 input), so any size divisible by the stride works;
- the GSC merges its two branches with a multiplicative gate as in the paper's figure; the released
  code adds them (``gsc_merge="add"``). Both have the same parameters.

Feature levels: one per stage, strides 2, 4, 8, 16 (for four stages), channels ``dims``.
"""
from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from mz_kernels._validate import check_choice, check_positive_int

from .._contract import Backbone
from .._registry import register_backbone
from ..layers.common import DropPath
from ..layers.mixer import MambaMixer
from ..layers.scans import TriOriented3D

GSC_MERGES = ("gate", "add")


def _int_tuple(op: str, name: str, value: object) -> tuple[int, ...]:
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) == 0:
        raise ValueError(f"{op}: {name} must be a non-empty sequence of positive ints, got {value!r}")
    return tuple(check_positive_int(op, name, v) for v in value)


def _conv_in_relu(dim: int, kernel: int) -> nn.Sequential:
    """``Conv3d(dim, dim, kernel) -> InstanceNorm3d -> ReLU`` at stride 1 (same size)."""
    return nn.Sequential(nn.Conv3d(dim, dim, kernel, padding=kernel // 2), nn.InstanceNorm3d(dim), nn.ReLU())


class GatedSpatialConv(nn.Module):
    """GSC: ``x + P(B3(x) * B1(x))`` with ``B3`` two 3x3x3 conv units, ``B1`` and ``P`` 1x1x1 conv units
    (each unit Conv -> InstanceNorm -> ReLU). ``merge="add"`` uses ``B3(x) + B1(x)`` (released code).

    Shapes: ``[B, C, D, H, W] -> [B, C, D, H, W]``.
    """

    def __init__(self, dim: int, merge: str = "gate"):
        super().__init__()
        check_choice("GatedSpatialConv", "merge", merge, GSC_MERGES)
        self.merge = merge
        self.branch3 = nn.Sequential(_conv_in_relu(dim, 3), _conv_in_relu(dim, 3))
        self.branch1 = _conv_in_relu(dim, 1)
        self.proj = _conv_in_relu(dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        a, g = self.branch3(x), self.branch1(x)
        return x + self.proj(a * g if self.merge == "gate" else a + g)


class TSMambaBlock(nn.Module):
    """``x + DropPath(ToM(LayerNorm(x)))`` on a volume: ``[B, C, D, H, W] -> [B, C, D, H, W]``.

    ToM is a :class:`MambaMixer` over :class:`TriOriented3D` (forward, reverse, inter-slice with the
    slice count read from ``x``), per-direction parameters, directions summed (SegMamba ``v3``).
    """

    def __init__(self, dim: int, *, d_state: int = 16, d_conv: int = 4, expand: float = 2.0, drop_path: float = 0.0):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mixer = MambaMixer(dim, TriOriented3D(), d_state=d_state, d_conv=d_conv, expand=expand, merge="sum")
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        B, C, D, H, W = x.shape
        tokens = x.flatten(2).transpose(1, 2)  # [B, D*H*W, C], D slowest
        y = self.mixer(self.norm(tokens), (D, H, W))
        return x + self.drop_path(y.transpose(1, 2).reshape(B, C, D, H, W))


class ChannelMlp(nn.Module):
    """1x1x1 conv MLP (``dim -> hidden -> dim``, GELU), SegMamba's ``MlpChannel``."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Conv3d(dim, hidden, 1), nn.GELU(), nn.Conv3d(hidden, dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SegMambaStage(nn.Module):
    """Downsample -> GSC -> ``depth`` TSMamba blocks; ``out`` (InstanceNorm + channel MLP) makes the feature map."""

    def __init__(self, downsample: nn.Module, dim: int, depth: int, *, gsc_merge: str, drop_paths: Sequence[float], **mixer_kw):
        super().__init__()
        self.downsample = downsample
        self.gsc = GatedSpatialConv(dim, gsc_merge)
        self.blocks = nn.ModuleList(TSMambaBlock(dim, drop_path=dp, **mixer_kw) for dp in drop_paths[:depth])
        self.out = nn.Sequential(nn.InstanceNorm3d(dim), ChannelMlp(dim, 2 * dim))


class SegMambaEncoder(Backbone):
    """SegMamba's 3D encoder: ``[B, in_chans, D, H, W]`` -> features ``[B, dims[i], D/2^(i+1), H/2^(i+1), W/2^(i+1)]``.

    Args:
        in_chans: input channels (modalities), e.g. 4 for BraTS.
        num_classes: classifier outputs on the pooled last feature map (0: none).
        dims: channels per stage (published: 48, 96, 192, 384).
        depths: TSMamba blocks per stage (published: 2, 2, 2, 2).
        d_state, d_conv, expand: Mamba hyper-parameters (published 16, 4, 2).
        gsc_merge: ``"gate"`` (paper) or ``"add"`` (released code) for the GSC branches.
        drop_path_rate: stochastic depth, linearly increasing over the blocks (the release uses 0).
        spatial_dims: must be 3.
        img_size: accepted for the common creation interface; unused (no position embedding, any
            size divisible by ``2 ** len(dims)`` works).

    Examples:
        >>> m = SegMambaEncoder(in_chans=4, dims=(8, 16, 32), depths=(1, 1, 1))
        >>> [f.shape[1:] for f in m.forward_intermediates(torch.randn(1, 4, 16, 32, 24))]
        [torch.Size([8, 8, 16, 12]), torch.Size([16, 4, 8, 6]), torch.Size([32, 2, 4, 3])]
    """

    def __init__(
        self,
        *,
        in_chans: int = 1,
        num_classes: int = 0,
        dims: Sequence[int] = (48, 96, 192, 384),
        depths: Sequence[int] = (2, 2, 2, 2),
        d_state: int = 16,
        d_conv: int = 4,
        expand: float = 2.0,
        gsc_merge: str = "gate",
        drop_path_rate: float = 0.0,
        spatial_dims: int = 3,
        img_size: int | Sequence[int] | None = None,
    ):
        op = type(self).__name__
        if spatial_dims != 3:
            raise ValueError(f"{op}: spatial_dims must be 3 (SegMamba is a volume encoder), got {spatial_dims!r}")
        dims, depths = _int_tuple(op, "dims", dims), _int_tuple(op, "depths", depths)
        if len(dims) != len(depths):
            raise ValueError(f"{op}: dims and depths must have the same length, got {len(dims)} and {len(depths)}")
        check_choice(op, "gsc_merge", gsc_merge, GSC_MERGES)
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"{op}: drop_path_rate must be in [0, 1), got {drop_path_rate!r}")
        super().__init__(spatial_dims=3, in_chans=in_chans, num_classes=num_classes, input_multiple=2 ** len(dims))
        self.dims, self.depths = dims, depths
        n = sum(depths)
        rates = [drop_path_rate * i / max(n - 1, 1) for i in range(n)]
        mixer_kw = dict(d_state=d_state, d_conv=d_conv, expand=expand)
        self.stages = nn.ModuleList()
        for i, (dim, depth) in enumerate(zip(dims, depths)):
            if i == 0:
                down: nn.Module = nn.Conv3d(in_chans, dim, kernel_size=7, stride=2, padding=3)
            else:
                down = nn.Sequential(nn.InstanceNorm3d(dims[i - 1]), nn.Conv3d(dims[i - 1], dim, kernel_size=2, stride=2))
            start = sum(depths[:i])
            self.stages.append(
                SegMambaStage(down, dim, depth, gsc_merge=gsc_merge, drop_paths=rates[start : start + depth], **mixer_kw)
            )
        self.feature_info = [
            dict(num_chs=dim, reduction=2 ** (i + 1), module=f"stages.{i}") for i, dim in enumerate(dims)
        ]
        self.num_features = dims[-1]
        self.reset_classifier(num_classes)

    def forward_stages(self, x: Tensor) -> list[Tensor]:
        """``[B, in_chans, D, H, W]`` -> one ``[B, dims[i], D/s, H/s, W/s]`` map per stage (s = 2^(i+1))."""
        feats = []
        for stage in self.stages:
            x = self.run_block(stage.gsc, stage.downsample(x))
            for block in stage.blocks:
                x = self.run_block(block, x)
            feats.append(stage.out(x))
        return feats


def _create(defaults: dict, kwargs: dict) -> SegMambaEncoder:
    return SegMambaEncoder(**{**defaults, **kwargs})


@register_backbone
def segmamba_enc_tiny(**kwargs) -> SegMambaEncoder:
    """The published SegMamba encoder: dims 48-96-192-384, depths 2-2-2-2, d_state 16."""
    return _create(dict(dims=(48, 96, 192, 384), depths=(2, 2, 2, 2)), kwargs)


@register_backbone
def segmamba_enc_small(**kwargs) -> SegMambaEncoder:
    """A wider SegMamba encoder (our choice, not published): dims 64-128-256-512, depths 2-2-2-2."""
    return _create(dict(dims=(64, 128, 256, 512), depths=(2, 2, 2, 2)), kwargs)


@register_backbone
def segmamba_enc_test(**kwargs) -> SegMambaEncoder:
    """Cheap variant for tests: three stages (stride 8), dims 8-16-32, one block each, d_state 4."""
    return _create(dict(dims=(8, 16, 32), depths=(1, 1, 1), d_state=4), kwargs)
