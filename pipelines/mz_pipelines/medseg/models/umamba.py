"""U-Mamba-Bot-style network (bowang-lab/U-Mamba ``UMambaBot_3d.py`` / ``UMambaBot_2d.py``), 2D and 3D.

A residual convolutional U-Net (nnU-Net's ``ResidualEncoder`` layout: conv -> InstanceNorm ->
LeakyReLU, stride-2 convolutions between stages) with one Mamba layer at the bottleneck only:
``LayerNorm -> Mamba`` over the flattened bottleneck voxels, run entirely in float32 (U-Mamba
disables autocast there). The decoder upsamples with transposed convolutions, concatenates the
skip and applies residual blocks; a 1x1 conv gives the logits. Deep supervision is left out
(the training loop here uses one output).

Stride: ``2 ** (len(features) - 1)``.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from mz_backbones.layers.common import CONV, CONV_T, INSTANCENORM
from mz_backbones.layers.mixer import MambaMixer
from mz_backbones.layers.scans import Unidirectional
from mz_kernels._validate import check_positive_int

from .registry import check_model_input


class ResidualBlock(nn.Module):
    """nnU-Net ``BasicBlockD``: ``act(norm(conv(act(norm(conv_s(x))))) + shortcut(x))``.

    The shortcut is identity, or (avg-pool when strided, then) 1x1 conv + norm when the shape changes.
    Shapes: ``[B, C_in, *S] -> [B, C_out, *S / stride]``.
    """

    def __init__(self, spatial_dims: int, in_ch: int, out_ch: int, stride: int = 1):
        super().__init__()
        conv, norm = CONV[spatial_dims], INSTANCENORM[spatial_dims]
        self.conv1 = conv(in_ch, out_ch, 3, stride=stride, padding=1)
        self.norm1 = norm(out_ch, affine=True)
        self.conv2 = conv(out_ch, out_ch, 3, padding=1)
        self.norm2 = norm(out_ch, affine=True)
        self.act = nn.LeakyReLU(0.01, inplace=True)
        if stride == 1 and in_ch == out_ch:
            self.shortcut: nn.Module = nn.Identity()
        else:
            pool = [nn.AvgPool2d, nn.AvgPool3d][spatial_dims - 2](stride) if stride > 1 else nn.Identity()
            self.shortcut = nn.Sequential(pool, conv(in_ch, out_ch, 1, bias=False), norm(out_ch, affine=True))

    def forward(self, x: Tensor) -> Tensor:
        y = self.norm2(self.conv2(self.act(self.norm1(self.conv1(x)))))
        return self.act(y + self.shortcut(x))


class MambaLayer(nn.Module):
    """U-Mamba's ``MambaLayer``: ``Mamba(LayerNorm(tokens))`` over all voxels in raster order, float32.

    Shapes: ``[B, C, *S] -> [B, C, *S]`` (no residual, as in U-Mamba).
    """

    def __init__(self, dim: int, *, d_state: int = 16, d_conv: int = 4, expand: float = 2.0):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mamba = MambaMixer(dim, Unidirectional(), d_state=d_state, d_conv=d_conv, expand=expand, merge="mean")

    def forward(self, x: Tensor) -> Tensor:
        B, C, *grid = x.shape
        with torch.autocast(device_type=x.device.type, enabled=False):
            tokens = x.float().flatten(2).transpose(1, 2)  # [B, L, C]
            y = self.mamba(self.norm(tokens), tuple(grid))
        return y.transpose(1, 2).reshape(B, C, *grid).to(x.dtype)


def _stack(spatial_dims: int, in_ch: int, out_ch: int, n: int, stride: int) -> nn.Sequential:
    """``n`` residual blocks; the first changes channels and applies ``stride``."""
    return nn.Sequential(
        *(ResidualBlock(spatial_dims, in_ch if i == 0 else out_ch, out_ch, stride if i == 0 else 1) for i in range(n))
    )


class UMambaBot(nn.Module):
    """U-Mamba-Bot-style U-Net ``[B, in_channels, *S] -> logits [B, out_channels, *S]`` (S 2D or 3D).

    Args:
        spatial_dims: 2 or 3.
        in_channels, out_channels: input modalities; classes including background.
        features: channels per resolution level, finest first (nnU-Net 3D default
            32, 64, 128, 256, 320, 320); level ``i`` is at stride ``2^i``.
        blocks: residual blocks per encoder stage (int or one per level).
        decoder_blocks: residual blocks per decoder stage (int or one per level above the bottleneck).
        d_state, d_conv, expand: Mamba hyper-parameters at the bottleneck (U-Mamba: 16, 4, 2).

    Examples:
        >>> net = UMambaBot(spatial_dims=2, in_channels=1, out_channels=3, features=(8, 16, 32))
        >>> net(torch.randn(2, 1, 20, 12)).shape
        torch.Size([2, 3, 20, 12])
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        out_channels: int = 2,
        features: Sequence[int] = (32, 64, 128, 256, 320, 320),
        blocks: int | Sequence[int] = 2,
        decoder_blocks: int | Sequence[int] = 1,
        d_state: int = 16,
        d_conv: int = 4,
        expand: float = 2.0,
    ):
        super().__init__()
        op = type(self).__name__
        if spatial_dims not in (2, 3):
            raise ValueError(f"{op}: spatial_dims must be 2 or 3, got {spatial_dims!r}")
        check_positive_int(op, "in_channels", in_channels)
        check_positive_int(op, "out_channels", out_channels)
        if isinstance(features, str) or not isinstance(features, Sequence) or len(features) < 2:
            raise ValueError(f"{op}: features must hold at least 2 positive ints (one per level), got {features!r}")
        features = tuple(check_positive_int(op, "features", f) for f in features)
        n = len(features)
        enc_blocks = self._per_level(op, "blocks", blocks, n)
        dec_blocks = self._per_level(op, "decoder_blocks", decoder_blocks, n - 1)
        self.spatial_dims, self.in_channels, self.out_channels = spatial_dims, in_channels, out_channels
        self.features, self.input_multiple = features, 2 ** (n - 1)
        self.stem = nn.Sequential(
            CONV[spatial_dims](in_channels, features[0], 3, padding=1),
            INSTANCENORM[spatial_dims](features[0], affine=True),
            nn.LeakyReLU(0.01, inplace=True),
        )
        self.encoder = nn.ModuleList(
            _stack(spatial_dims, features[max(i - 1, 0)], features[i], enc_blocks[i], 1 if i == 0 else 2) for i in range(n)
        )
        self.bottleneck_ssm = MambaLayer(features[-1], d_state=d_state, d_conv=d_conv, expand=expand)
        self.upsample = nn.ModuleList(
            CONV_T[spatial_dims](features[i + 1], features[i], 2, stride=2) for i in reversed(range(n - 1))
        )
        self.decoder = nn.ModuleList(
            _stack(spatial_dims, 2 * features[i], features[i], dec_blocks[i], 1) for i in reversed(range(n - 1))
        )
        self.head = CONV[spatial_dims](features[0], out_channels, 1)

    @staticmethod
    def _per_level(op: str, name: str, value: int | Sequence[int], n: int) -> tuple[int, ...]:
        if isinstance(value, int) and not isinstance(value, bool):
            return (check_positive_int(op, name, value),) * n
        if isinstance(value, str) or not isinstance(value, Sequence) or len(value) != n:
            raise ValueError(f"{op}: {name} must be a positive int or {n} positive ints, got {value!r}")
        return tuple(check_positive_int(op, name, v) for v in value)

    def forward(self, x: Tensor) -> Tensor:
        """``x [B, in_channels, *S]`` (each size a multiple of ``input_multiple``) -> ``[B, out_channels, *S]``."""
        check_model_input(type(self).__name__, x, in_channels=self.in_channels, spatial_dims=self.spatial_dims,
                          multiple=self.input_multiple)
        y = self.stem(x)
        skips = []
        for stage in self.encoder:
            y = stage(y)
            skips.append(y)
        y = self.bottleneck_ssm(y)
        for up, dec, skip in zip(self.upsample, self.decoder, reversed(skips[:-1])):
            y = dec(torch.cat([up(y), skip], dim=1))
        return self.head(y)
