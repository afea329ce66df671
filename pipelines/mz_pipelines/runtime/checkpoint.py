"""Checkpoints: written atomically, read with ``torch.load(weights_only=True)``.

A checkpoint is a dict of plain data (str, numbers, bools, None, lists, tuples, dicts) and tensors;
configs go in as ``config_to_dict(cfg)``, never as dataclass objects, so loading needs no pickle
allow-list. :func:`save_checkpoint` marks it with ``format`` so other files are rejected clearly.
"""
from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import UserError, require_file
from .files import atomic_open

FORMAT = "mambazoo-checkpoint/1"


def save_checkpoint(state: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write ``state`` (plus a format marker) to ``path`` atomically: temporary file, fsync, rename.

    If anything fails mid-way (an exception, or the process dies), the previous file at ``path``
    stays intact and loadable.
    """
    payload = {"format": FORMAT, **state}
    with atomic_open(path, "wb") as f:
        torch.save(payload, f)
    return Path(path)


def load_checkpoint(path: str | os.PathLike[str], *, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (``weights_only=True``).

    Raises:
        UserError: missing file, not a torch file, corrupt, or not a mambazoo checkpoint.
    """
    p = require_file(path, "checkpoint")
    try:
        obj = torch.load(p, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, zipfile.BadZipFile, OSError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"cannot read checkpoint {p}: {first}") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise UserError(f"{p} is not a mambazoo checkpoint (expected format {FORMAT!r})")
    return obj


def load_model_weights(model: nn.Module, state_dict: Mapping[str, torch.Tensor], *, source: str | os.PathLike[str]) -> None:
    """``model.load_state_dict(state_dict)`` with a one-line ``UserError`` when they do not match.

    A mismatch means the config used to build ``model`` differs from the one the weights were trained with.
    """
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as e:
        detail = " ".join(str(e).split())
        if len(detail) > 300:
            detail = detail[:300] + "..."
        raise UserError(f"checkpoint {source} does not match the model built from the config: {detail}") from None
