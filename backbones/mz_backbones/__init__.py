"""mz_backbones: Vim/VMamba-style 2D, 3D and 1D state-space backbones, created by name like timm.

Every model follows one contract (:class:`Backbone`): ``forward_features``, ``forward_head``,
``forward_intermediates`` returning channel-first feature maps with declared channels and strides
(``feature_info``), ``features_only``/``out_indices``, ``no_weight_decay``, gradient checkpointing,
and ``pretrained=path`` loading (official Vim/VMamba/PlainMamba key layouts are mapped).
"""
from __future__ import annotations

from ._contract import Backbone, unwrap_state_dict
from ._registry import create_backbone, list_backbones, register_backbone

__all__ = ["Backbone", "create_backbone", "list_backbones", "register_backbone", "unwrap_state_dict"]
