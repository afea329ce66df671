"""The one contract every zoo backbone follows (2D, 3D and 1D alike).

A backbone declares ``feature_info`` (one dict per feature level: ``num_chs``, ``reduction``,
``module``) and implements :meth:`Backbone.forward_stages`, which returns those levels as
channel-first maps (``[B, C, H, W]``, ``[B, C, D, H, W]`` or ``[B, C, L]``). Everything else
(input checks, ``features_only`` / ``out_indices``, pooling head, checkpoint loading, gradient
checkpointing, ``no_weight_decay``) is provided here.
"""
from __future__ import annotations

import pickle
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .layers.common import run_checkpointed

NO_WEIGHT_DECAY_KEYS = ("A_log", "A_logs", "pos_embed", "cls_token", "direction_Bs", "dt_bias", "absolute_pos_embed")


class Backbone(nn.Module):
    """Base class of every zoo model.

    Subclasses call ``super().__init__(spatial_dims=..., in_chans=..., num_classes=..., input_multiple=...)``,
    set ``self.feature_info`` and ``self.num_features``, build ``self.head`` with :meth:`reset_classifier`,
    and implement :meth:`forward_stages`. Plain (non-hierarchical) models with a class token override
    :meth:`forward_features` / :meth:`forward_head`.
    """

    def __init__(self, *, spatial_dims: int, in_chans: int, num_classes: int, input_multiple: int | Sequence[int]):
        super().__init__()
        if spatial_dims not in (1, 2, 3):
            raise ValueError(f"{type(self).__name__}: spatial_dims must be 1, 2 or 3, got {spatial_dims!r}")
        if isinstance(in_chans, bool) or not isinstance(in_chans, int) or in_chans < 1:
            raise ValueError(f"{type(self).__name__}: in_chans must be a positive int, got {in_chans!r}")
        self.spatial_dims = spatial_dims
        self.in_chans = in_chans
        self.num_classes = num_classes
        mult = (input_multiple,) * spatial_dims if isinstance(input_multiple, int) else tuple(input_multiple)
        self.input_multiple: tuple[int, ...] = mult
        self.feature_info: list[dict[str, Any]] = []
        self.num_features = 0
        self.features_only = False
        self.out_indices: tuple[int, ...] | None = None
        self.grad_checkpointing = False

    # ---- to implement -------------------------------------------------------------------------
    def forward_stages(self, x: Tensor) -> list[Tensor]:
        """All feature levels, in ``feature_info`` order, channel-first."""
        raise NotImplementedError

    # ---- provided -----------------------------------------------------------------------------
    def check_input(self, x: Tensor) -> None:
        """ValueError unless ``x`` is ``[B, in_chans, *spatial]`` with every size a multiple of the stride."""
        name = type(self).__name__
        want = self.spatial_dims + 2
        dims = ["B", "C", *("D H W".split()[3 - self.spatial_dims :] if self.spatial_dims > 1 else ["L"])]
        if not isinstance(x, Tensor) or x.dim() != want:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{name}: input must be [{', '.join(dims)}] ({want} dims), got {got}")
        if x.shape[1] != self.in_chans:
            raise ValueError(f"{name}: input must have {self.in_chans} channels (in_chans), got {x.shape[1]} (shape {tuple(x.shape)})")
        sizes = tuple(x.shape[2:])
        if any(s < m or s % m for s, m in zip(sizes, self.input_multiple)):
            raise ValueError(
                f"{name}: spatial size {sizes} must be a positive multiple of {self.input_multiple} (the model's stride)"
            )

    def set_output(self, *, features_only: bool = False, out_indices: Sequence[int] | None = None) -> None:
        """Choose what ``forward`` returns: logits/pooled features, or the feature maps at ``out_indices``."""
        n = len(self.feature_info)
        if out_indices is not None:
            idx = tuple(int(i) for i in out_indices)
            bad = [i for i in idx if not -n <= i < n]
            if bad:
                raise ValueError(f"{type(self).__name__}: out_indices {list(idx)} out of range for {n} feature levels")
            out_indices = tuple(i % n for i in idx)
        self.features_only = bool(features_only)
        self.out_indices = out_indices

    def forward_intermediates(self, x: Tensor, indices: Sequence[int] | None = None) -> list[Tensor]:
        """Feature maps at ``indices`` of ``feature_info`` (default all), channel-first."""
        self.check_input(x)
        feats = self.forward_stages(x)
        return feats if indices is None else [feats[i] for i in indices]

    def forward_features(self, x: Tensor) -> Tensor:
        """The final representation (the last feature map for hierarchical models)."""
        self.check_input(x)
        return self.forward_stages(x)[-1]

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Global average pool over the spatial dims, then the classifier (identity when num_classes=0)."""
        pooled = x.mean(dim=tuple(range(2, x.dim())))
        return pooled if pre_logits else self.head(pooled)

    def forward(self, x: Tensor) -> Tensor | list[Tensor]:
        if self.features_only:
            return self.forward_intermediates(x, self.out_indices)
        return self.forward_head(self.forward_features(x))

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def no_weight_decay(self) -> set[str]:
        """Parameter names that should get no weight decay (SSM A/D/dt terms, embeddings, tokens)."""
        return {
            n for n, p in self.named_parameters()
            if any(k in n.split(".")[-1] for k in NO_WEIGHT_DECAY_KEYS) or n.split(".")[-1] == "D" or p.dim() <= 1
        }

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = bool(enable)

    def run_block(self, block: Callable[..., Tensor], *args: Any) -> Tensor:
        """Call ``block(*args)``, through activation checkpointing when enabled and training."""
        return run_checkpointed(self.grad_checkpointing and self.training, block, *args)

    # ---- weights ------------------------------------------------------------------------------
    def checkpoint_filter_fn(self, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """Map a foreign state dict (e.g. an official release) onto this model's keys. Default: identity."""
        return state_dict

    def load_pretrained(self, path: str | Path) -> None:
        """Load weights from ``path`` (``torch.load(weights_only=True)``), mapping keys with
        :meth:`checkpoint_filter_fn`; a classifier of another size is skipped (left initialised).

        Raises:
            ValueError: missing/unreadable file, or keys/shapes that do not fit this model.
        """
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"{type(self).__name__}: pretrained checkpoint {str(p)!r} does not exist")
        try:
            obj = torch.load(p, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ValueError(f"{type(self).__name__}: cannot read checkpoint {str(p)!r}: {first}") from None
        sd = unwrap_state_dict(obj, source=str(p))
        sd = self.checkpoint_filter_fn(dict(sd))
        own = self.state_dict()
        head_skip = [k for k in sd if k.startswith("head.") and (k not in own or own[k].shape != sd[k].shape)]
        for k in head_skip:
            sd.pop(k)
        missing = [k for k in own if k not in sd and not (k.startswith("head.") and head_skip)]
        unexpected = [k for k in sd if k not in own]
        shape_bad = [f"{k}: {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in sd if k in own and sd[k].shape != own[k].shape]
        if missing or unexpected or shape_bad:
            parts = []
            if missing:
                parts.append(f"missing {len(missing)} keys (e.g. {missing[:3]})")
            if unexpected:
                parts.append(f"unexpected {len(unexpected)} keys (e.g. {unexpected[:3]})")
            if shape_bad:
                parts.append(f"shape mismatch {shape_bad[:3]}")
            raise ValueError(f"{type(self).__name__}: checkpoint {str(p)!r} does not fit: " + "; ".join(parts))
        self.load_state_dict(sd, strict=False)


def unwrap_state_dict(obj: object, *, source: str) -> Mapping[str, Tensor]:
    """Return the tensor dict inside common checkpoint wrappers (``model``, ``state_dict``, ``module.`` prefixes)."""
    for key in ("model", "state_dict", "model_state", "module"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"checkpoint {source!r} holds no state dict of tensors")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return obj
