"""Checkpoints: atomic writes survive a failure or a crash mid-save; loads are weights_only and fail clearly."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from mz_pipelines.runtime.checkpoint import FORMAT, load_checkpoint, load_model_weights, save_checkpoint
from mz_pipelines.runtime.errors import UserError
from mz_pipelines.runtime.files import atomic_write_text
from mz_pipelines.runtime.seeding import capture_rng_state, restore_rng_state, seed_everything


class _FailsWhenSaved:
    """Pickling this object raises: torch.save fails after the file was opened."""

    def __reduce__(self) -> tuple[object, ...]:
        raise RuntimeError("disk on fire")


def _state(seed: int) -> dict[str, object]:
    g = torch.Generator().manual_seed(seed)
    return {"step": seed, "model": {"w": torch.randn(7, 5, generator=g)}, "config": {"model": {"width": 5}, "tags": ["a", "b"]}}


def test_round_trip_is_weights_only_plain_data(tmp_path: Path) -> None:
    path = save_checkpoint(_state(3), tmp_path / "ckpt" / "checkpoint.pt")
    got = load_checkpoint(path)
    assert got["format"] == FORMAT and got["step"] == 3 and got["config"] == {"model": {"width": 5}, "tags": ["a", "b"]}
    assert torch.equal(got["model"]["w"], _state(3)["model"]["w"])
    assert torch.load(path, weights_only=True)["step"] == 3
    assert [p.name for p in path.parent.iterdir()] == ["checkpoint.pt"]  # no temporary files left


def test_exception_mid_save_keeps_previous_checkpoint(tmp_path: Path) -> None:
    path = save_checkpoint(_state(1), tmp_path / "checkpoint.pt")
    with pytest.raises(RuntimeError, match="disk on fire"):
        save_checkpoint({**_state(2), "bad": _FailsWhenSaved()}, path)
    assert load_checkpoint(path)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


def test_naive_torch_save_would_have_lost_the_checkpoint(tmp_path: Path) -> None:
    # The failure mode the atomic write prevents: torch.save truncates the target before pickling.
    path = save_checkpoint(_state(1), tmp_path / "checkpoint.pt")
    with pytest.raises(RuntimeError):
        torch.save({**_state(2), "bad": _FailsWhenSaved()}, path)
    with pytest.raises(UserError, match="cannot read checkpoint"):
        load_checkpoint(path)


def test_process_killed_mid_save_keeps_previous_checkpoint(tmp_path: Path) -> None:
    # A child saves 16 MiB checkpoints in a loop (most of its time is spent inside a write) and is
    # SIGKILLed at an arbitrary moment; whatever the moment, checkpoint.pt must load and be whole.
    script = textwrap.dedent(
        f"""
        import sys, torch
        from mz_pipelines.runtime.checkpoint import save_checkpoint

        path, step = {str(tmp_path / "checkpoint.pt")!r}, 0
        while True:
            step += 1
            save_checkpoint({{"step": step, "w": torch.full((1 << 22,), float(step))}}, path)
            if step == 1:
                print("saved", flush=True)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "saved"
        time.sleep(0.4)
    finally:
        proc.kill()
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    got = load_checkpoint(tmp_path / "checkpoint.pt")
    assert got["step"] >= 1 and torch.equal(got["w"], torch.full((1 << 22,), float(got["step"])))
    save_checkpoint({"step": 0}, tmp_path / "checkpoint.pt")  # a later save removes any torn temporary file
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "cannot read checkpoint"),
        (b"not a zip file at all", "cannot read checkpoint"),
        (None, "is not a mambazoo checkpoint"),
    ],
    ids=["empty", "garbage", "foreign-torch-file"],
)
def test_bad_files_are_user_errors(tmp_path: Path, content: bytes | None, message: str) -> None:
    path = tmp_path / "x.pt"
    if content is None:
        torch.save({"state_dict": {"w": torch.ones(2)}}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(UserError, match=message):
        load_checkpoint(path)


def test_unsafe_pickle_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"format": FORMAT, "obj": Path("x")}, path)  # arbitrary class: not allowed by weights_only
    with pytest.raises(UserError, match="cannot read checkpoint"):
        load_checkpoint(path)


def test_missing_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"^checkpoint not found: "):
        load_checkpoint(tmp_path / "none.pt")


def test_load_model_weights_mismatch_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(UserError) as e:
        load_model_weights(nn.Linear(3, 4), nn.Linear(3, 5).state_dict(), source="runs/x/best.pt")
    assert "runs/x/best.pt does not match the model" in str(e.value) and "\n" not in str(e.value)


def test_rng_state_round_trip_through_a_checkpoint(tmp_path: Path) -> None:
    seed_everything(11)
    torch.rand(5), np.random.rand(3), random.random(), np.random.randn()  # move every stream, incl. numpy's gauss cache
    save_checkpoint({"rng": capture_rng_state()}, tmp_path / "rng.pt")
    expected = (torch.rand(4), np.random.rand(4), random.random(), np.random.randn())
    seed_everything(999)
    restore_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])
    got = (torch.rand(4), np.random.rand(4), random.random(), np.random.randn())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2:] == expected[2:]


def test_atomic_text_write_replaces_whole_file(tmp_path: Path) -> None:
    p = atomic_write_text(tmp_path / "a" / "summary.json", "x" * 1000)
    atomic_write_text(p, "short")
    assert p.read_text() == "short" and os.listdir(p.parent) == ["summary.json"]
