"""SegMamba-style 3D segmentation network: the zoo's SegMamba encoder + a MONAI UNETR-style decoder.

Layout (ge-xing/SegMamba ``model_segmamba/segmamba.py``, generalised to any number of stages):

- encoder: :class:`mz_backbones.families.segmamba.SegMambaEncoder` (stem ``Conv3d k7 s2``, per stage
  a gated spatial conv and tri-orientated Mamba blocks); stage ``i`` gives ``dims[i]`` channels at
  stride ``2^(i+1)``;
- ``encoder1``: a residual ``UnetrBasicBlock`` on the raw input at full resolution -> ``dims[0]``;
- ``encoders[i]``: ``UnetrBasicBlock`` on stage ``i``'s feature, ``dims[i] -> dims[i+1]``;
- ``bottleneck``: ``UnetrBasicBlock`` on the last stage, ``dims[-1] -> hidden_size`` at stride
  ``2^n_stages`` (768 in the release);
- ``decoders``: ``UnetrUpBlock`` (transposed conv x2, concat skip, residual block) back to stride 1,
  then ``decoder1`` (``UnetrBasicBlock``) and ``UnetOutBlock`` (1x1x1 conv) to ``out_channels``.

The total stride is ``2 ** len(dims)`` (16 for the published four stages): any ``D, H, W`` that are
multiples of it work (the inter-slice scan reads its slice count from the feature map). The SSM
inside the encoder always runs in float32, also under autocast.
"""
from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
from torch import Tensor, nn

from mz_backbones.layers.common import run_checkpointed
from mz_kernels._validate import check_positive_int

from .lean_blocks import LeanUnetrUpBlock, set_block_impl
from .registry import check_model_input


def _dims_for(feature_size: int | Sequence[int], n_stages: int) -> tuple[int, ...]:
    """``48 -> (48, 96, 192, 384)`` for 4 stages; a sequence is checked and returned as a tuple."""
    if isinstance(feature_size, int) and not isinstance(feature_size, bool):
        check_positive_int("SegMambaNet", "feature_size", feature_size)
        return tuple(feature_size * 2**i for i in range(n_stages))
    if isinstance(feature_size, str) or not isinstance(feature_size, Sequence) or len(feature_size) == 0:
        raise ValueError(f"SegMambaNet: feature_size must be a positive int or a tuple of stage widths, got {feature_size!r}")
    return tuple(check_positive_int("SegMambaNet", "feature_size", d) for d in feature_size)


class SegMambaNet(nn.Module):
    """SegMamba-style 3D network ``[B, in_channels, D, H, W] -> logits [B, out_channels, D, H, W]``.

    Args:
        spatial_dims: must be 3 (a volume network).
        in_channels: input channels (modalities).
        out_channels: classes, background included.
        feature_size: first stage width (doubled per stage) or one width per stage
            (published: 48 -> 48/96/192/384).
        depths: TSMamba blocks per stage (published: 2, 2, 2, 2); its length sets the number of
            stages (stride ``2 ** len(depths)``).
        hidden_size: bottleneck width (published: 768).
        d_state, d_conv, expand: Mamba hyper-parameters of the encoder (published 16, 4, 2).
        gsc_merge: ``"gate"`` (paper figure) or ``"add"`` (released code) for the GSC branches.
        norm_name: MONAI norm of the decoder blocks (release: ``"instance"``).
        res_block: residual decoder blocks (release: True).
        drop_path_rate: stochastic depth in the encoder.
        use_checkpoint: activation checkpointing in training (MONAI's ``SwinUNETR`` argument): every
            GSC, TSMamba and UNETR block keeps only its input and is recomputed in the backward pass.
            Same gradients; full preset, CPU fp32, lean blocks: a training step at 128^3 peaks at
            4171 instead of 7810 MiB (64^3: 364 instead of 753), 10-20% slower.
        block_impl: ``"lean"`` (default) runs the UNETR residual blocks with
            :mod:`.lean_blocks` (same parameters and maths; norms keep only their outputs for
            backward, up-blocks read the skip without concatenating, in-place channels-last
            inference); ``"monai"`` runs MONAI's own forward. Weights load either way. Full preset at
            128^3, CPU fp32: training peak 7810 vs 11131 MiB, inference 1941 vs 2321 MiB.

    Examples:
        >>> net = SegMambaNet(in_channels=1, out_channels=2, feature_size=(8, 16, 32), depths=(1, 1, 1),
        ...                   hidden_size=64, d_state=4)
        >>> net(torch.randn(1, 1, 32, 48, 16)).shape
        torch.Size([1, 2, 32, 48, 16])
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        out_channels: int = 2,
        feature_size: int | Sequence[int] = 48,
        depths: Sequence[int] = (2, 2, 2, 2),
        hidden_size: int = 768,
        d_state: int = 16,
        d_conv: int = 4,
        expand: float = 2.0,
        gsc_merge: str = "gate",
        norm_name: str | tuple = "instance",
        res_block: bool = True,
        drop_path_rate: float = 0.0,
        use_checkpoint: bool = False,
        block_impl: str = "lean",
    ):
        super().__init__()
        from monai.networks.blocks import UnetOutBlock, UnetrBasicBlock, UnetrUpBlock

        from mz_backbones.families.segmamba import SegMambaEncoder

        op = type(self).__name__
        if spatial_dims != 3:
            raise ValueError(f"{op}: spatial_dims must be 3 (SegMamba is a 3D network), got {spatial_dims!r}")
        check_positive_int(op, "in_channels", in_channels)
        check_positive_int(op, "out_channels", out_channels)
        check_positive_int(op, "hidden_size", hidden_size)
        if isinstance(depths, str) or not isinstance(depths, Sequence) or len(depths) == 0:
            raise ValueError(f"{op}: depths must be a non-empty sequence of positive ints, got {depths!r}")
        dims = _dims_for(feature_size, len(depths))
        if len(dims) != len(depths):
            raise ValueError(f"{op}: feature_size and depths must have one entry per stage, got {len(dims)} and {len(depths)}")
        if not isinstance(use_checkpoint, bool):
            raise ValueError(f"{op}: use_checkpoint must be True or False, got {use_checkpoint!r}")
        self.in_channels, self.out_channels, self.dims = in_channels, out_channels, dims
        self.input_multiple = 2 ** len(dims)
        self.encoder = SegMambaEncoder(
            in_chans=in_channels, dims=dims, depths=tuple(depths), d_state=d_state, d_conv=d_conv, expand=expand,
            gsc_merge=gsc_merge, drop_path_rate=drop_path_rate,
        )
        block = dict(spatial_dims=3, kernel_size=3, norm_name=norm_name, res_block=res_block)
        self.encoder1 = UnetrBasicBlock(in_channels=in_channels, out_channels=dims[0], stride=1, **block)
        self.encoders = nn.ModuleList(
            UnetrBasicBlock(in_channels=dims[i], out_channels=dims[i + 1], stride=1, **block) for i in range(len(dims) - 1)
        )
        self.bottleneck = UnetrBasicBlock(in_channels=dims[-1], out_channels=hidden_size, stride=1, **block)
        widths = (*dims, hidden_size)  # decoder i: widths[i+1] -> widths[i], deepest first
        self.decoders = nn.ModuleList(
            UnetrUpBlock(in_channels=widths[i + 1], out_channels=widths[i], upsample_kernel_size=2, **block)
            for i in reversed(range(len(dims)))
        )
        self.decoder1 = UnetrBasicBlock(in_channels=dims[0], out_channels=dims[0], stride=1, **block)
        self.out = UnetOutBlock(spatial_dims=3, in_channels=dims[0], out_channels=out_channels)
        self.set_grad_checkpointing(use_checkpoint)
        self.set_block_impl(block_impl)

    def set_block_impl(self, impl: str) -> None:
        """Run the decoder's residual blocks as ``"lean"`` or ``"monai"`` (see :mod:`.lean_blocks`)."""
        set_block_impl(self, impl, op=type(self).__name__)
        self.block_impl = impl

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing of every block (encoder included) in training, on or off."""
        self.use_checkpoint = bool(enable)
        self.encoder.set_grad_checkpointing(self.use_checkpoint)

    def forward(self, x: Tensor) -> Tensor:
        """``x [B, in_channels, D, H, W]`` (each size a multiple of ``input_multiple``) ->
        logits ``[B, out_channels, D, H, W]``."""
        check_model_input(type(self).__name__, x, in_channels=self.in_channels, spatial_dims=3, multiple=self.input_multiple)
        ckpt = self.use_checkpoint and self.training
        run = partial(run_checkpointed, ckpt)
        feats = self.encoder.forward_stages(x)  # strides 2, 4, ..., 2^n
        skips = [run(self.encoder1, x)] + [run(enc, f) for enc, f in zip(self.encoders, feats[:-1])]
        y = run(self.bottleneck, feats[-1])
        del feats
        for dec in self.decoders:
            if isinstance(dec, LeanUnetrUpBlock) and not ckpt:  # never concatenates; frees the skip once read
                y = dec.forward_popping(y, skips)
            elif ckpt:
                y = run(dec, y, skips.pop())
            else:  # UnetrUpBlock.forward, dropping the skip once concatenated (-1 full-size map at the peak)
                y = torch.cat((dec.transp_conv(y), skips.pop()), dim=1)
                y = dec.conv_block(y)
        y = self.out(run(self.decoder1, y))
        return y if torch.is_grad_enabled() else y.contiguous()  # lean inference runs channels-last
