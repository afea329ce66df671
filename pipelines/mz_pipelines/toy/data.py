"""Synthetic data of the toy domain and its files.

``x`` ``[N, L, C]`` is white noise; the target is ``y_t = sum_c w_c s_{t,c} + noise`` with the hidden
recurrence ``s_t = a * s_{t-1} + x_t`` (decays ``a`` and weights ``w`` fixed by ``data.seed``), so a
diagonal SSM can fit it exactly. ``synth`` writes ``train.npz`` / ``val.npz`` (arrays ``x``, ``y``)
and ``meta.json`` into a folder.
"""
from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import numpy as np

from mz_pipelines.runtime.errors import UserError, require_dir, require_file
from mz_pipelines.runtime.files import atomic_open, write_json

from .config import ToyDataConfig

SPLITS = ("train", "val")


def hidden_system(channels: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Decays ``[C]`` in (0.5, 0.95) and output weights ``[C]`` of the data-generating recurrence."""
    rng = np.random.default_rng([seed, 0])
    return rng.uniform(0.5, 0.95, size=channels), rng.normal(0.0, 1.0, size=channels) / np.sqrt(channels)


def make_split(cfg: ToyDataConfig, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Generate one split: ``x`` ``[N, L, C]``, ``y`` ``[N, L, 1]``, float32, deterministic in ``cfg.seed``."""
    if split not in SPLITS:
        raise ValueError(f"make_split: split must be one of {list(SPLITS)}, got {split!r}")
    n = cfg.n_train if split == "train" else cfg.n_val
    rng = np.random.default_rng([cfg.seed, 1 + SPLITS.index(split)])
    decay, weight = hidden_system(cfg.channels, cfg.seed)
    x = rng.standard_normal((n, cfg.length, cfg.channels))
    s, states = np.zeros((n, cfg.channels)), np.empty_like(x)
    for t in range(cfg.length):
        s = decay * s + x[:, t]
        states[:, t] = s
    y = states @ weight + cfg.noise * rng.standard_normal((n, cfg.length))
    return x.astype(np.float32), y[..., None].astype(np.float32)


def write_dataset(folder: str | os.PathLike[str], cfg: ToyDataConfig) -> list[Path]:
    """Write both splits and ``meta.json`` to ``folder``; returns the written paths."""
    out = Path(folder)
    paths = []
    for split in SPLITS:
        x, y = make_split(cfg, split)
        with atomic_open(out / f"{split}.npz", "wb") as f:
            np.savez(f, x=x, y=y)
        paths.append(out / f"{split}.npz")
    decay, weight = hidden_system(cfg.channels, cfg.seed)
    meta = {
        "length": cfg.length,
        "channels": cfg.channels,
        "noise": cfg.noise,
        "seed": cfg.seed,
        "decay": decay.tolist(),
        "weight": weight.tolist(),
    }
    paths.append(write_json(out / "meta.json", meta))
    return paths


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            if not isinstance(z, np.lib.npyio.NpzFile):
                raise UserError(f"{path}: expected an .npz archive, got a single array")
            return {k: z[k] for k in z.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
        raise UserError(f"{path}: not a NumPy .npz file ({' '.join(str(e).split())[:120]})") from None


def _check_x(x: np.ndarray, channels: int, where: Path) -> np.ndarray:
    if x.ndim != 3 or x.shape[2] != channels or x.shape[1] < 1:
        raise UserError(f"{where}: expected x of shape [N, L, {channels}], got {tuple(x.shape)}")
    if not np.issubdtype(x.dtype, np.floating):
        raise UserError(f"{where}: expected floating-point x, got dtype {x.dtype}")
    return x.astype(np.float32, copy=False)


def read_split(folder: str | os.PathLike[str], split: str, *, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """``x`` ``[N, L, C]`` and ``y`` ``[N, L, 1]`` of one split written by :func:`write_dataset`.

    Raises:
        UserError: missing folder or file, not an .npz, missing arrays, or wrong shapes.
    """
    path = require_file(require_dir(folder, "toy data folder") / f"{split}.npz", f"toy {split} split")
    arrays = _load_npz(path)
    missing = [k for k in ("x", "y") if k not in arrays]
    if missing:
        raise UserError(f"{path}: missing arrays {missing} (found {sorted(arrays)}); write data with `synth`")
    x, y = _check_x(arrays["x"], channels, path), arrays["y"]
    if y.shape != (*x.shape[:2], 1):
        raise UserError(f"{path}: expected y of shape {(*x.shape[:2], 1)}, got {tuple(y.shape)}")
    return x, y.astype(np.float32, copy=False)


def load_split(cfg: ToyDataConfig, split: str) -> tuple[np.ndarray, np.ndarray]:
    """The split from ``cfg.path`` if set, else generated in memory."""
    return read_split(cfg.path, split, channels=cfg.channels) if cfg.path else make_split(cfg, split)


def read_inputs(path: str | os.PathLike[str], *, channels: int) -> np.ndarray:
    """Inputs for ``predict``: an ``.npy`` array or the ``x`` array of an ``.npz``, ``[N, L, C]``."""
    p = require_file(path, "input file")
    if p.suffix == ".npz":
        arrays = _load_npz(p)
        if "x" not in arrays:
            raise UserError(f"{p}: no array named 'x' (found {sorted(arrays)})")
        return _check_x(arrays["x"], channels, p)
    if p.suffix != ".npy":
        raise UserError(f"{p}: unsupported input format {p.suffix or '(none)'!r}; expected .npy or .npz")
    try:
        x = np.load(p, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise UserError(f"{p}: not a NumPy .npy file ({' '.join(str(e).split())[:120]})") from None
    return _check_x(x, channels, p)


def read_meta(folder: str | os.PathLike[str]) -> dict[str, object]:
    """``meta.json`` of a data folder."""
    p = require_file(Path(folder) / "meta.json", "toy data meta file")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{p}: invalid JSON ({e.msg} at line {e.lineno})") from None
