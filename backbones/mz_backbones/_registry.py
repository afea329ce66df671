"""The backbone registry: a dict of entry functions, a decorator, glob listing and ``create_backbone``."""
from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

_ENTRYPOINTS: dict[str, Callable[..., nn.Module]] = {}


def register_backbone(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register ``fn`` under its function name (``@register_backbone def vim_tiny(**kw): ...``).

    Raises:
        ValueError: a backbone of that name is already registered (names are never overwritten).
    """
    name = fn.__name__
    if name in _ENTRYPOINTS and _ENTRYPOINTS[name] is not fn:
        raise ValueError(f"register_backbone: a backbone named {name!r} is already registered")
    _ENTRYPOINTS[name] = fn
    return fn


def list_backbones(pattern: str = "*", *, exclude: str | None = None) -> list[str]:
    """Sorted registered names matching the glob ``pattern`` (and not ``exclude``)."""
    _import_families()
    names = [n for n in _ENTRYPOINTS if fnmatch.fnmatch(n, pattern)]
    if exclude is not None:
        names = [n for n in names if not fnmatch.fnmatch(n, exclude)]
    return sorted(names)


def create_backbone(
    name: str,
    *,
    pretrained: bool | str | Path = False,
    num_classes: int = 0,
    features_only: bool = False,
    out_indices: tuple[int, ...] | list[int] | None = None,
    **overrides: Any,
) -> nn.Module:
    """Build a registered backbone by name, like ``timm.create_model``.

    Args:
        name: registered name (see :func:`list_backbones`).
        pretrained: ``False``, or the path of a checkpoint file: our own, or an official release of
            the family (Vim, VMamba, PlainMamba), whose keys are mapped by the family's filter.
        num_classes: classifier outputs; 0 for no classifier (``forward`` returns pooled features).
        features_only: ``forward`` returns the feature maps at ``out_indices`` (channel-first).
        out_indices: which entries of ``feature_info`` to return (default: all).
        **overrides: architecture arguments such as ``in_chans``, ``img_size``, ``drop_path_rate``,
            ``d_state``; ``None`` values are dropped.

    Raises:
        ValueError: unknown name (with close matches), bad arguments, or weights that do not fit.
    """
    _import_families()
    if name not in _ENTRYPOINTS:
        close = difflib.get_close_matches(name, list(_ENTRYPOINTS), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else "; see list_backbones()"
        raise ValueError(f"create_backbone: unknown backbone {name!r}{hint}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
        raise ValueError(f"create_backbone: num_classes must be an int >= 0, got {num_classes!r}")
    kwargs = {k: v for k, v in overrides.items() if v is not None}
    model = _ENTRYPOINTS[name](num_classes=num_classes, **kwargs)
    if pretrained is not False and pretrained is not None:
        if pretrained is True:
            raise ValueError(
                "create_backbone: pretrained=True needs a hub download, which mambazoo never does; pass the checkpoint's path"
            )
        model.load_pretrained(pretrained)
    model.set_output(features_only=features_only, out_indices=out_indices)
    return model


def _import_families() -> None:
    from . import families  # noqa: F401  (importing registers every family)
