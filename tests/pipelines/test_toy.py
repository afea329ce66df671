"""The toy reference domain: recurrence paths agree, data files round-trip and bad files are rejected clearly."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mz_pipelines.runtime.config import resolve_config
from mz_pipelines.runtime.errors import UserError
from mz_pipelines.toy.config import ToyConfig, ToyDataConfig
from mz_pipelines.toy.data import hidden_system, load_split, make_split, read_inputs, read_split, write_dataset
from mz_pipelines.toy.model import DiagonalRecurrence, ToySSM


@pytest.mark.parametrize("B, L, D", [(1, 1, 1), (2, 17, 5), (3, 40, 7)], ids=lambda v: str(v))
def test_conv_recurrence_matches_the_loop_with_gradients(B: int, L: int, D: int) -> None:
    torch.manual_seed(0)
    loop, conv = DiagonalRecurrence(D, mode="loop"), DiagonalRecurrence(D, mode="conv")
    conv.load_state_dict(loop.state_dict())
    x1 = torch.randn(B, L, D, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    y1, y2 = loop(x1), conv(x2)
    g = torch.randn_like(y1)
    (y1 * g).sum().backward()
    (y2 * g).sum().backward()
    assert torch.allclose(y1, y2, rtol=1e-5, atol=1e-5)
    assert torch.allclose(x1.grad, x2.grad, rtol=1e-5, atol=1e-5)
    assert torch.allclose(loop.decay_logit.grad, conv.decay_logit.grad, rtol=1e-4, atol=1e-4)


def test_recurrence_is_the_documented_one() -> None:
    rec = DiagonalRecurrence(2, mode="conv")
    with torch.no_grad():
        rec.decay_logit.copy_(torch.tensor([0.0, 100.0]))  # a = 0.5 and a = 1
    x = torch.tensor([[[1.0, 1.0], [0.0, 1.0], [2.0, 1.0]]])
    assert torch.allclose(rec(x), torch.tensor([[[1.0, 1.0], [0.5, 2.0], [2.25, 3.0]]]))


def test_model_shapes_and_input_checks() -> None:
    assert ToySSM(3, 4)(torch.randn(2, 9, 3)).shape == (2, 9, 1)
    with pytest.raises(ValueError, match=r"ToySSM: x must have shape \[B, L, C\] = \[\*, \*, 3\], got \(2, 9, 4\)"):
        ToySSM(3, 4)(torch.randn(2, 9, 4))
    with pytest.raises(ValueError, match=r"DiagonalRecurrence: mode must be one of \['conv', 'loop'\], got 'fft'"):
        DiagonalRecurrence(3, mode="fft")


def test_targets_follow_the_hidden_system() -> None:
    cfg = ToyDataConfig(n_train=5, length=7, channels=2, noise=0.0, seed=3)
    x, y = make_split(cfg, "train")
    decay, weight = hidden_system(2, 3)
    s = np.zeros((5, 2))
    for t in range(7):
        s = decay * s + x[:, t]
        assert np.allclose(y[:, t, 0], s @ weight, atol=1e-5)
    x2, _ = make_split(cfg, "train")
    xv, _ = make_split(cfg, "val")
    assert np.array_equal(x, x2) and not np.array_equal(x[:1], xv[:1])


def test_dataset_files_round_trip(tmp_path: Path) -> None:
    cfg = resolve_config(ToyConfig, overrides=["data.n_train=6", "data.n_val=4", "data.length=5"])
    write_dataset(tmp_path / "d", cfg.data)
    for split in ("train", "val"):
        x, y = read_split(tmp_path / "d", split, channels=3)
        ex, ey = make_split(cfg.data, split)
        assert np.array_equal(x, ex) and np.array_equal(y, ey)
    from_path = resolve_config(ToyConfig, overrides=[f"data.path={tmp_path / 'd'}"])
    assert np.array_equal(load_split(from_path.data, "val")[0], make_split(cfg.data, "val")[0])
    assert read_inputs(tmp_path / "d" / "val.npz", channels=3).shape == (4, 5, 3)


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"x": np.zeros((2, 4, 3), np.float32)}, "missing arrays ['y']"),
        ({"x": np.zeros((2, 4, 2), np.float32), "y": np.zeros((2, 4, 1), np.float32)}, "expected x of shape [N, L, 3], got (2, 4, 2)"),
        ({"x": np.zeros((2, 4, 3), np.float32), "y": np.zeros((2, 4), np.float32)}, "expected y of shape (2, 4, 1), got (2, 4)"),
    ],
    ids=["no-y", "channels", "y-shape"],
)
def test_bad_split_files(tmp_path: Path, arrays: dict[str, np.ndarray], message: str) -> None:
    np.savez(tmp_path / "train.npz", **arrays)
    with pytest.raises(UserError) as e:
        read_split(tmp_path, "train", channels=3)
    assert message in str(e.value)


def test_missing_and_foreign_files(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"^toy data folder not found: "):
        read_split(tmp_path / "none", "train", channels=3)
    with pytest.raises(UserError, match=r"^toy train split not found: "):
        read_split(tmp_path, "train", channels=3)
    (tmp_path / "train.npz").write_text("not numpy")
    with pytest.raises(UserError, match=r"train\.npz: not a NumPy \.npz file"):
        read_split(tmp_path, "train", channels=3)
    (tmp_path / "x.csv").write_text("1,2")
    with pytest.raises(UserError, match=r"unsupported input format '\.csv'; expected \.npy or \.npz"):
        read_inputs(tmp_path / "x.csv", channels=3)
