"""Adapters that plug zoo backbones into other frameworks. Each adapter module imports its framework,
so it is imported only when used (never by ``import mz_backbones``):

* :mod:`mz_backbones.integrations.mmseg`: registers ``MZBackbone`` in mmsegmentation 1.x's ``MODELS``
  (install the ``mmseg`` extra; load it from a config with
  ``custom_imports = dict(imports=["mz_backbones.integrations.mmseg"])``).

The mmseg configs shipped with the package are found with :func:`mmseg_config`.
"""
from __future__ import annotations

from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"

__all__ = ["CONFIG_DIR", "list_mmseg_configs", "mmseg_config"]


def list_mmseg_configs() -> list[str]:
    """Names (file stems) of the shipped mmsegmentation configs, sorted."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.py") if not p.name.startswith("_"))


def mmseg_config(name: str) -> Path:
    """Path of a shipped mmsegmentation config, for ``mmengine.Config.fromfile`` or ``_base_``.

    Examples:
        >>> mmseg_config("upernet_vim_tiny_ade20k").name
        'upernet_vim_tiny_ade20k.py'

    Raises:
        ValueError: ``name`` is not one of :func:`list_mmseg_configs`.
    """
    names = list_mmseg_configs()
    stem = name[:-3] if isinstance(name, str) and name.endswith(".py") else name
    if stem not in names:
        raise ValueError(f"mmseg_config: name must be one of {names}, got {name!r}")
    return CONFIG_DIR / f"{stem}.py"
