"""mmsegmentation 1.x adapter: importing this module registers ``MZBackbone`` in ``mmseg.registry.MODELS``.

``MZBackbone`` builds any zoo backbone with ``create_backbone(name, features_only=True, ...)`` and
returns its feature pyramid as a tuple of ``[B, C_i, H / r_i, W / r_i]`` maps (mmseg's convention), so
decode heads and necks (``UPerHead``, ``MultiLevelNeck``, ...) take it as they take Swin or ViT.

Load it from a config, without patching mmseg's tools::

    custom_imports = dict(imports=["mz_backbones.integrations.mmseg"], allow_failed_imports=False)
    model = dict(backbone=dict(type="MZBackbone", name="vmamba_tiny_s1l8", out_indices=(0, 1, 2, 3)))

Needs the ``mmseg`` extra (``mmcv==2.1.0``, ``mmengine>=0.10,<1``, ``mmsegmentation==1.2.2``,
``ftfy``, ``regex``). mmsegmentation 1.2.2 asserts ``2.0.0rc4 <= mmcv < 2.2.0`` at import; this
module checks the installed mmcv first and raises an ImportError that says what to install.
"""
from __future__ import annotations

from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import torch.nn.functional as F
from torch import Tensor

from .._registry import create_backbone

_MMCV_RANGE = ((2, 0, 0), (2, 2, 0))  # what mmsegmentation 1.2.2 asserts in its __init__


def _check_mmcv() -> None:
    """ImportError naming the fix when mmcv is missing or outside the range mmseg 1.2.2 asserts."""
    try:
        version = metadata.version("mmcv")
    except metadata.PackageNotFoundError:
        raise ImportError(
            "mz_backbones.integrations.mmseg needs mmcv 2.1.0 (pip install 'mambazoo[mmseg]')"
        ) from None
    release = tuple(int(p) if p.isdigit() else 0 for p in version.split("+")[0].split(".")[:3])
    lo, hi = _MMCV_RANGE
    if not lo <= release < hi:
        raise ImportError(
            f"mz_backbones.integrations.mmseg: mmsegmentation 1.2.2 needs 2.0.0rc4 <= mmcv < 2.2.0, "
            f"got mmcv {version}; pip install 'mmcv==2.1.0'"
        )


_check_mmcv()

from mmengine.model import BaseModule  # noqa: E402  (after the version check)
from mmseg.registry import MODELS  # noqa: E402

__all__ = ["MZBackbone"]


@MODELS.register_module()
class MZBackbone(BaseModule):
    """Any zoo backbone as an mmseg backbone: ``forward(x) -> tuple`` of channel-first feature maps.

    Args:
        name: registered zoo name (``mz_backbones.list_backbones()``), e.g. ``"vmamba_tiny_s1l8"``.
        out_indices: entries of the model's ``feature_info`` to return (default: all levels).
        pretrained: path of a checkpoint (ours, or an official Vim/VMamba/PlainMamba release; keys are
            mapped by the family's ``checkpoint_filter_fn``); ``None`` for random initialisation. mmseg's
            ``EncoderDecoder(pretrained=...)`` forwards its value here.
        pad_to_multiple: zero-pad inputs at the bottom/right up to the model's stride (``input_multiple``)
            and crop every output back to ``ceil(H / reduction)``, so whole-image inference works on
            any image size. With ``False`` such inputs raise ValueError.
        grad_checkpointing: activation checkpointing in every block (saves memory when training).
        init_cfg: mmengine's usual ``init_cfg`` (e.g. ``dict(type="Pretrained", checkpoint=...)`` for a
            checkpoint already in this model's key layout).
        **overrides: architecture arguments of the zoo model (``img_size``, ``drop_path_rate``,
            ``d_state``, ``in_chans``, ...).

    Attributes:
        out_channels: channels of each returned map; ``strides``: their reductions.

    Examples:
        >>> backbone = MZBackbone("vmamba_test", out_indices=(0, 1, 2, 3))
        >>> [f.shape[1] for f in backbone(torch.randn(1, 3, 64, 64))] == backbone.out_channels
        True
    """

    def __init__(
        self,
        name: str,
        out_indices: Sequence[int] | None = None,
        pretrained: str | Path | None = None,
        *,
        pad_to_multiple: bool = True,
        grad_checkpointing: bool = False,
        init_cfg: dict | list[dict] | None = None,
        **overrides: Any,
    ) -> None:
        super().__init__(init_cfg=init_cfg)
        for arg, v in (("pad_to_multiple", pad_to_multiple), ("grad_checkpointing", grad_checkpointing)):
            if not isinstance(v, bool):
                raise ValueError(f"MZBackbone: {arg} must be True or False, got {v!r}")
        if pretrained is not None and not isinstance(pretrained, (str, Path)):
            raise ValueError(f"MZBackbone: pretrained must be a checkpoint path or None, got {pretrained!r}")
        self.model = create_backbone(
            name,
            pretrained=pretrained or False,
            num_classes=0,
            features_only=True,
            out_indices=None if out_indices is None else tuple(out_indices),
            **overrides,
        )
        self.model.set_grad_checkpointing(grad_checkpointing)
        self.backbone_name = name
        self.pad_to_multiple = pad_to_multiple
        levels = self.model.out_indices if self.model.out_indices is not None else range(len(self.model.feature_info))
        infos = [self.model.feature_info[i] for i in levels]
        self.out_channels: list[int] = [int(i["num_chs"]) for i in infos]
        self.strides: list[int] = [int(i["reduction"]) for i in infos]

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        """``x [B, C, H, W]`` -> tuple of ``[B, out_channels[i], ceil(H / strides[i]), ceil(W / strides[i])]``."""
        sizes = tuple(x.shape[2:])
        if self.pad_to_multiple and x.dim() == self.model.spatial_dims + 2:
            pads = [(-s) % m for s, m in zip(sizes, self.model.input_multiple)]
            if any(pads):
                flat = [p for pad in reversed(pads) for p in (0, pad)]  # F.pad takes the last dim first
                x = F.pad(x, flat)
        feats = self.model(x)
        if x.shape[2:] != sizes:
            feats = [
                f[(..., *(slice(0, -(-s // r)) for s in sizes))] for f, r in zip(feats, self.strides)
            ]
        return tuple(feats)
