"""Resume: an interrupted run continued with --resume ends with the same weights as an uninterrupted one."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from mz_pipelines.runtime.checkpoint import load_checkpoint
from mz_pipelines.runtime.config import resolve_config
from mz_pipelines.runtime.engine import TrainResult, train
from mz_pipelines.runtime.metrics import read_metrics
from mz_pipelines.runtime.rundir import RunDir
from mz_pipelines.toy.config import ToyConfig
from mz_pipelines.toy.task import build_task

# 96 samples / batch 16 = 6 steps per epoch; evaluation every 5 steps, checkpoints every 4.
SMALL = [
    "data.n_train=96", "data.n_val=40", "data.length=12", "model.width=6", "train.batch_size=16",
    "train.log_every=3", "train.eval_every=5", "train.checkpoint_every=4", "train.warmup_steps=3", "train.steps=20",
]


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def toy(tmp: Path, name: str, *extra: str) -> ToyConfig:
    return resolve_config(ToyConfig, overrides=[*SMALL, f"run.root={tmp}", f"run.name={name}", *extra])


def run(cfg: ToyConfig, **kw: object) -> TrainResult:
    rd = RunDir.for_config(cfg.run, "toy")
    return train(lambda: build_task(cfg), cfg.train, run_dir=rd, config=cfg, quiet=True, **kw)  # type: ignore[arg-type]


def final_state(tmp: Path, name: str) -> dict[str, torch.Tensor]:
    return load_checkpoint(tmp / "toy" / name / "checkpoint.pt")["model"]


def assert_same_run(tmp: Path, a: str, b: str) -> None:
    wa, wb = final_state(tmp, a), final_state(tmp, b)
    for k in wa:
        assert torch.allclose(wa[k], wb[k], rtol=0, atol=1e-6), (k, (wa[k] - wb[k]).abs().max())
    strip = lambda rs: [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rs]  # noqa: E731
    ma, mb = (read_metrics(tmp / "toy" / n / "metrics.jsonl") for n in (a, b))
    assert strip(ma) == strip(mb)  # the resumed log has every step once, with the same values
    ba, bb = (load_checkpoint(tmp / "toy" / n / "best.pt") for n in (a, b))
    assert ba["step"] == bb["step"] and all(torch.equal(ba["model"][k], bb["model"][k]) for k in ba["model"])


def python_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.mark.parametrize("stop", [7, 12, 17], ids=["mid-epoch", "epoch-end", "after-checkpoint"])
def test_stop_then_resume_equals_uninterrupted(tmp_path: Path, stop: int) -> None:
    ref = run(toy(tmp_path, "ref"))
    part = run(toy(tmp_path, "part"), stop_after=stop)
    assert (part.stopped, part.step) == ("stop_after", stop)
    assert json.loads((tmp_path / "toy" / "part" / "summary.json").read_text())["stopped"] == "stop_after"
    resumed = run(toy(tmp_path, "part"), resume=True)
    assert (resumed.stopped, resumed.step) == ("completed", ref.step)
    for k, v in ref.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k  # bit-identical on CPU
    assert_same_run(tmp_path, "ref", "part")


def test_fresh_process_resumes_from_the_run_folder(tmp_path: Path) -> None:
    run(toy(tmp_path, "ref"))
    run(toy(tmp_path, "part"), stop_after=9)
    # A new process with only the run name: config, weights, optimiser, RNG and data position all
    # come from the run folder.
    proc = subprocess.run(
        [sys.executable, "-m", "mz_pipelines.toy", "train", "--resume", "--quiet", "--set", f"run.root={tmp_path}", "run.name=part"],
        capture_output=True, text=True, env=python_env(), timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("completed at step 20;")
    assert_same_run(tmp_path, "ref", "part")


@pytest.mark.slow
def test_killed_process_resumes_from_its_last_checkpoint(tmp_path: Path) -> None:
    # A real crash: SIGKILL a training process at an arbitrary step, then resume in a new process.
    # Steps after the last checkpoint are redone, and their log lines are replaced, not duplicated.
    extra = ["train.steps=1500", "train.eval_every=100", "train.checkpoint_every=10", "train.log_every=5"]
    args = ["--set", *SMALL, f"run.root={tmp_path}", "run.name=part", *extra]
    proc = subprocess.Popen([sys.executable, "-m", "mz_pipelines.toy", "train", "--quiet", *args], env=python_env())
    metrics = tmp_path / "toy" / "part" / "metrics.jsonl"
    try:
        deadline = time.monotonic() + 240
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 8) and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        proc.kill()
        proc.wait(timeout=60)
    assert proc.returncode == -9, "the training finished before it could be killed"
    killed_at = max(r["step"] for r in read_metrics(metrics))
    assert 40 <= killed_at < 1500
    resumed = subprocess.run(
        [sys.executable, "-m", "mz_pipelines.toy", "train", "--resume", "--quiet", "--set", f"run.root={tmp_path}", "run.name=part"],
        capture_output=True, text=True, env=python_env(), timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr
    run(toy(tmp_path, "ref", *extra))
    assert_same_run(tmp_path, "ref", "part")
