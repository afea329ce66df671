"""Typed configs: dataclass defaults < YAML file < ``--set key=value`` overrides.

A config is a dataclass whose fields all have defaults; a field whose type is another dataclass is
a *section* (``train``, ``model`` ...), addressed with dotted keys (``train.lr``). Supported field
types: ``int``, ``float``, ``bool``, ``str``, ``Literal[...]``, ``X | None``, ``list[T]``,
``tuple[T, ...]``, ``tuple[A, B]``, ``dict[str, T]`` and nested dataclasses. Every value is checked
against its field type; unknown keys are errors with a close-match suggestion. ``__post_init__``
checks run on the final, merged values and a ``ValueError`` there becomes a :class:`UserError`.

Examples:
    >>> cfg = resolve_config(MyConfig, yaml_path="exp.yaml", overrides=["train.lr=3e-4"])
    >>> save_config(cfg, "runs/toy/exp/config.yaml")
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import os
import types
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from .errors import UserError
from .files import atomic_write_text

C = TypeVar("C")

_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")
_NONE = ("none", "null", "~")


class _Bad(Exception):
    """A value that does not fit its field type; the message completes ``config key 'k' ...``."""


def is_config_class(tp: object) -> bool:
    """``True`` for a dataclass *type* (a config section)."""
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """Resolved type of every init field of the config class ``cls`` (string annotations evaluated)."""
    if not is_config_class(cls):
        raise TypeError(f"field_types: cls must be a dataclass type, got {cls!r}")
    hints = get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def config_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key of ``cls``: sections and leaves, e.g. ``['train', 'train.lr', ...]``."""
    keys: list[str] = []
    for name, tp in field_types(cls).items():
        keys.append(prefix + name)
        if is_config_class(tp):
            keys.extend(config_keys(tp, prefix + name + "."))
    return keys


def _unknown_key(cls: type, key: str) -> str:
    keys = config_keys(cls)
    match = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    if not match:  # right field name under the wrong (or no) section: 'lr' -> 'train.lr'
        last = key.rsplit(".", 1)[-1]
        by_leaf = {k.rsplit(".", 1)[-1]: k for k in reversed(keys)}
        leaf = difflib.get_close_matches(last, list(by_leaf), n=1, cutoff=0.75)
        match = [by_leaf[leaf[0]]] if leaf else []
    hint = f" (did you mean '{match[0]}'?)" if match else ""
    return f"unknown config key '{key}'{hint}"


def _describe(tp: Any) -> str:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in get_args(tp))
    if origin is Literal:
        return f"one of {list(get_args(tp))}"
    if tp is type(None):
        return "None"
    if origin is not None:
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", str(tp))


def _parse_text(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise _Bad(f"cannot parse {text!r} as YAML ({getattr(e, 'problem', None) or 'syntax error'})") from None


def _coerce(value: Any, tp: Any, *, text: bool) -> Any:
    """``value`` converted to ``tp``; ``text`` means it came from the command line as a string."""
    if tp is Any:
        return _parse_text(value) if text else value
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if type(None) in args and (value is None or (text and value.strip().lower() in _NONE)):
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, text=text)
            except _Bad:
                pass
        raise _Bad(f"expects {_describe(tp)}, got {value!r}")
    if origin is Literal:
        choices = get_args(tp)
        for c in choices:
            if text and (str(c) == value or (isinstance(c, bool) and value.lower() == str(c).lower())):
                return c
            if not text and value == c and type(value) is type(c):
                return c
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise _Bad(f"expects one of {list(choices)}, got {value!r}{hint}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if text and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        raise _Bad(f"expects bool (true/false), got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if text:
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise _Bad(f"expects int, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # also YAML: PyYAML reads `1e-3` (no dot) as a string
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise _Bad(f"expects float, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Bad(f"expects str, got {value!r} ({type(value).__name__}); quote it in YAML")
    if tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
        raise _Bad(f"expects a path string, got {value!r}")
    if origin in (list, tuple):
        items, item_text = value, False
        if text:
            stripped = value.strip()
            if stripped.startswith("["):
                items = _parse_text(stripped)
            else:
                items, item_text = ([s.strip() for s in stripped.split(",")] if stripped else []), True
        if not isinstance(items, (list, tuple)):
            raise _Bad(f"expects {_describe(tp)}, got {value!r}")
        args = get_args(tp)
        if origin is list or (len(args) == 2 and args[1] is Ellipsis):
            out = [_coerce(v, args[0] if args else Any, text=item_text) for v in items]
            return out if origin is list else tuple(out)
        if len(items) != len(args):
            raise _Bad(f"expects {len(args)} items ({_describe(tp)}), got {len(items)}: {value!r}")
        return tuple(_coerce(v, a, text=item_text) for v, a in zip(items, args))
    if origin is dict:
        mapping = _parse_text(value) if text else value
        if not isinstance(mapping, Mapping):
            raise _Bad(f"expects a mapping ({_describe(tp)}), got {value!r}")
        ktp, vtp = get_args(tp) or (Any, Any)
        return {_coerce(k, ktp, text=False): _coerce(v, vtp, text=False) for k, v in mapping.items()}
    raise TypeError(f"config field type {tp!r} is not supported")


def _tree(cfg: Any) -> dict[str, Any]:
    """Field values of a config instance as nested dicts (values copied, types kept)."""
    return {
        f.name: _tree(v) if dataclasses.is_dataclass(v := getattr(cfg, f.name)) else copy.deepcopy(v)
        for f in dataclasses.fields(cfg)
        if f.init
    }


def _merge(cls: type, tree: dict[str, Any], layer: Mapping[Any, Any], *, source: str, root: type, prefix: str = "") -> None:
    hints = field_types(cls)
    for key, value in layer.items():
        full = f"{prefix}{key}"
        if not isinstance(key, str) or key not in hints:
            raise UserError(f"{source}: {_unknown_key(root, full)}")
        tp = hints[key]
        if is_config_class(tp):
            if not isinstance(value, Mapping):
                raise UserError(f"{source}: config key '{full}' is a section; give a mapping of its fields, got {value!r}")
            _merge(tp, tree[key], value, source=source, root=root, prefix=full + ".")
            continue
        try:
            tree[key] = _coerce(value, tp, text=False)
        except _Bad as e:
            raise UserError(f"{source}: config key '{full}' {e}") from None


def _apply_override(cls: type, tree: dict[str, Any], item: str) -> None:
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise UserError(f"--set expects KEY=VALUE, got {item!r}")
    parts = key.split(".")
    section, node = cls, tree
    for i, part in enumerate(parts):
        hints = field_types(section)
        if part not in hints:
            raise UserError(f"--set: {_unknown_key(cls, key)}")
        tp = hints[part]
        last = i == len(parts) - 1
        if is_config_class(tp):
            if last:
                try:
                    mapping = _parse_text(text)
                except _Bad as e:
                    raise UserError(f"--set: config key '{key}' {e}") from None
                if not isinstance(mapping, Mapping):
                    example = f"{key}.{next(iter(field_types(tp)))}=..."
                    raise UserError(f"--set: config key '{key}' is a section; set one of its fields, e.g. '{example}'")
                _merge(tp, node[part], mapping, source="--set", root=cls, prefix=key + ".")
                return
            section, node = tp, node[part]
        elif not last:
            raise UserError(f"--set: config key '{'.'.join(parts[: i + 1])}' is a value, not a section (in '{key}')")
        else:
            try:
                node[part] = _coerce(text, tp, text=True)
            except _Bad as e:
                raise UserError(f"--set: config key '{key}' {e}") from None


def _build(cls: type[C], tree: Mapping[str, Any], prefix: str = "") -> C:
    kwargs = {
        name: _build(tp, tree[name], f"{prefix}{name}.") if is_config_class(tp) else tree[name]
        for name, tp in field_types(cls).items()
    }
    try:
        return cls(**kwargs)
    except ValueError as e:  # __post_init__ checks; their messages name the full key ('train.steps ...')
        raise UserError(f"invalid config: {e}") from None


def load_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The mapping in a YAML config file; ``UserError`` naming the file if missing or malformed."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file not found: {p}" if not p.exists() else f"config file is not a file: {p}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"config file '{p}': not UTF-8 text") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise UserError(f"config file '{p}': invalid YAML{where}: {getattr(e, 'problem', None) or e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file '{p}': expected a mapping of config keys at the top level, got {type(data).__name__}")
    return data


def resolve_config(
    cls: type[C],
    *,
    yaml_path: str | os.PathLike[str] | None = None,
    overrides: Iterable[str] = (),
    base: Mapping[str, Any] | None = None,
) -> C:
    """Build a config: ``cls()`` defaults < ``base`` < YAML file < ``overrides`` (``"a.b=value"``).

    Args:
        cls: config dataclass; every field needs a default.
        yaml_path: optional YAML file (a nested mapping of config keys).
        overrides: ``KEY=VALUE`` strings; values are parsed by the field type
            (``true``/``false``, ``1e-3``, ``16,32`` or ``[16, 32]`` for lists, ``none`` for optional fields).
        base: plain mapping layered right over the defaults (e.g. a run folder's saved config).

    Raises:
        UserError: unknown key (with a close-match suggestion), value of the wrong type, unreadable
            YAML (the message names the file), or a ``ValueError`` from the dataclass's ``__post_init__``.
    """
    tree = _tree(cls())
    if base is not None:
        _merge(cls, tree, base, source="saved config", root=cls)
    if yaml_path is not None:
        _merge(cls, tree, load_yaml(yaml_path), source=f"config file '{yaml_path}'", root=cls)
    for item in overrides:
        _apply_override(cls, tree, item)
    return _build(cls, tree)


def config_from_dict(cls: type[C], data: Mapping[str, Any], *, source: str = "config") -> C:
    """Strictly rebuild a config from plain data (e.g. the copy stored in a checkpoint)."""
    tree = _tree(cls())
    _merge(cls, tree, data, source=source, root=cls)
    return _build(cls, tree)


def _plain(v: Any) -> Any:
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return {f.name: _plain(getattr(v, f.name)) for f in dataclasses.fields(v) if f.init}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, Mapping):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, Path):
        return str(v)
    return v


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain data (dicts, lists, str, numbers, bools, None): safe for YAML, JSON and ``weights_only`` checkpoints."""
    if not dataclasses.is_dataclass(cfg) or isinstance(cfg, type):
        raise TypeError(f"config_to_dict: cfg must be a dataclass instance, got {type(cfg).__name__}")
    return _plain(cfg)


def dump_config(cfg: Any) -> str:
    """The config as YAML text, in field order."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None)


def save_config(cfg: Any, path: str | os.PathLike[str]) -> Path:
    """Write the config as YAML (atomically); ``resolve_config(type(cfg), yaml_path=path)`` reads it back."""
    return atomic_write_text(path, dump_config(cfg))
