"""The training engine on the toy domain: determinism, learning, run-folder files, best checkpoint,
early stop, schedules, clipping, and the errors a user can trigger."""
from __future__ import annotations

import io
import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml

from mz_pipelines.runtime.checkpoint import load_checkpoint
from mz_pipelines.runtime.config import config_to_dict, resolve_config
from mz_pipelines.runtime.engine import TrainResult, train
from mz_pipelines.runtime.errors import UserError
from mz_pipelines.runtime.metrics import read_metrics
from mz_pipelines.runtime.optim import lr_factor
from mz_pipelines.runtime.precision import autocast, float32_forward, resolve_amp
from mz_pipelines.runtime.progress import Progress
from mz_pipelines.runtime.rundir import RunDir
from mz_pipelines.runtime.sampler import GlobalBatchSampler
from mz_pipelines.toy.config import ToyConfig
from mz_pipelines.toy.task import build_task

SMALL = [
    "data.n_train=96", "data.n_val=40", "data.length=12", "model.width=6",
    "train.batch_size=16", "train.log_every=5", "train.warmup_steps=0",
]


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    # Tiny models on a shared 2-core machine: one intra-op thread is faster and steadier.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def toy(*overrides: str) -> ToyConfig:
    return resolve_config(ToyConfig, overrides=[*SMALL, *overrides])


def run(cfg: ToyConfig, tmp: Path | None = None, **kw: object) -> TrainResult:
    rd = None if tmp is None else RunDir(tmp / "run")
    return train(lambda: build_task(cfg), cfg.train, run_dir=rd, config=cfg, quiet=True, **kw)  # type: ignore[arg-type]


def weights(result: TrainResult) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in result.model.state_dict().items()}


def test_same_seed_same_weights_and_the_model_learns() -> None:
    cfg = toy("train.steps=60", "train.eval_every=30")
    a, b = run(cfg), run(cfg)
    assert all(torch.equal(a_, b_) for a_, b_ in zip(weights(a).values(), weights(b).values()))
    assert a.stopped == "completed" and a.step == 60
    assert a.last_eval is not None and a.last_eval["r2"] > 0.9, a.last_eval
    c = run(toy("train.steps=60", "train.eval_every=30", "train.seed=1"))
    assert not torch.equal(weights(a)["inp.weight"], weights(c)["inp.weight"])


def test_run_folder_holds_config_metrics_summary_figures_and_checkpoints(tmp_path: Path) -> None:
    cfg = toy("train.steps=30", "train.eval_every=10", "train.checkpoint_every=20", "train.warmup_steps=5")
    result = run(cfg, tmp_path)
    rd = RunDir(tmp_path / "run")
    assert yaml.safe_load(rd.config.read_text()) == config_to_dict(cfg)

    records = read_metrics(rd.metrics)
    train_steps = [r["step"] for r in records if r["split"] == "train"]
    val = [r for r in records if r["split"] == "val"]
    assert train_steps == [5, 10, 15, 20, 25, 30] and [r["step"] for r in val] == [10, 20, 30]
    for r in records:
        if r["split"] == "train":  # the logged lr is the one used at that step
            assert r["lr"] == pytest.approx(cfg.train.lr * lr_factor(r["step"] - 1, total=30, warmup=5), rel=1e-6)
    assert {"loss", "mae", "r2"} <= set(val[0])

    summary = json.loads(rd.summary.read_text())
    best_val = min(val, key=lambda r: r["loss"])
    assert summary["stopped"] == "completed" and summary["step"] == 30 and summary["precision"] == "float32"
    assert summary["best"]["step"] == best_val["step"] and summary["best"]["value"] == best_val["loss"]
    assert result.best is not None and result.best["step"] == best_val["step"]

    best = load_checkpoint(rd.best)
    assert best["kind"] == "best" and best["step"] == best_val["step"] and best["metrics"]["loss"] == best_val["loss"]
    last = load_checkpoint(rd.checkpoint)
    assert last["step"] == 30 and {"model", "optimizer", "scheduler", "scaler", "ranks", "loop", "config"} <= set(last)
    assert last["config"] == config_to_dict(cfg) and last["loop"]["step"] == 30
    assert all(torch.equal(last["model"][k], v) for k, v in weights(result).items())

    for name in ("loss.png", "metrics.png"):
        assert (rd.figures / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_early_stop_after_patience_evaluations_without_improvement(tmp_path: Path) -> None:
    # min_delta so large that nothing after the first evaluation counts as an improvement.
    cfg = toy("train.steps=100", "train.eval_every=5", "train.patience=2", "train.min_delta=1e9")
    result = run(cfg, tmp_path)
    assert (result.stopped, result.step) == ("early_stop", 15)
    assert result.best is not None and result.best["step"] == 5
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (summary["stopped"], summary["step"]) == ("early_stop", 15)
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["step"] == 15


def test_monitor_max_tracks_the_largest_value(tmp_path: Path) -> None:
    result = run(toy("train.steps=20", "train.eval_every=5", "train.monitor=r2", "train.monitor_mode=max"), tmp_path)
    val = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["split"] == "val"]
    assert result.best is not None and result.best["value"] == max(r["r2"] for r in val)


def test_gradient_clipping_changes_the_update_only_when_active() -> None:
    off = weights(run(toy("train.steps=8", "train.grad_clip=0")))
    never = weights(run(toy("train.steps=8", "train.grad_clip=1e9")))
    tight = weights(run(toy("train.steps=8", "train.grad_clip=0.01")))
    assert all(torch.equal(off[k], never[k]) for k in off)
    assert not torch.allclose(off["inp.weight"], tight["inp.weight"])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.monitor=accuracy"], "train.monitor='accuracy' is not an evaluation metric; available: ['loss', 'mae', 'r2']"),
        (["train.batch_size=128"], "train.batch_size=128 exceeds the training set size (96)"),
        (["train.amp=bf16", "train.device=cpu"], "train.amp='bf16' needs a CUDA device"),
    ],
    ids=["unknown-monitor", "batch-too-big", "amp-on-cpu"],
)
def test_user_errors(overrides: list[str], message: str) -> None:
    with pytest.raises(UserError) as e:
        run(toy("train.steps=5", "train.eval_every=5", *overrides))
    assert message in str(e.value)


def test_existing_run_needs_resume_or_overwrite(tmp_path: Path) -> None:
    cfg = toy("train.steps=5")
    run(cfg, tmp_path)
    with pytest.raises(UserError, match="already holds a run; pass --resume to continue it, --overwrite to replace it"):
        run(cfg, tmp_path)
    (tmp_path / "run" / "notes.txt").write_text("mine")
    run(toy("train.steps=7"), tmp_path, overwrite=True)
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["step"] == 7
    assert max(r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")) == 7
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"  # only run files are replaced
    with pytest.raises(UserError, match="no checkpoint in"):
        run(cfg, tmp_path / "elsewhere", resume=True)


def test_diverging_loss_is_reported() -> None:
    with pytest.raises(UserError, match=r"training diverged: loss is (nan|inf) at step \d+"):
        run(toy("train.steps=40", "train.lr=1e30", "train.grad_clip=0", "train.schedule=constant"))


@pytest.mark.parametrize("world", [1, 2, 3], ids=lambda w: f"world{w}")
def test_sampler_shares_cover_each_global_batch(world: int) -> None:
    n, g = 50, 12  # 4 full global batches per epoch, 2 samples dropped
    samplers = [GlobalBatchSampler(n, g, seed=7, rank=r, world_size=world) for r in range(world)]
    single = GlobalBatchSampler(n, g, seed=7)
    for epoch in (0, 1):
        for s in [*samplers, single]:
            s.set_position(epoch, 0)
        shares = [list(s) for s in samplers]
        for i, batch in enumerate(single):
            union = sorted(idx for share in shares for idx in share[i])
            assert union == sorted(batch) and len(batch) == g
            assert all(len(share[i]) == g // world for share in shares)
    epoch0 = single.permutation(0)
    assert not torch.equal(epoch0, single.permutation(1)) and torch.equal(epoch0, GlobalBatchSampler(n, g, seed=7).permutation(0))
    assert not torch.equal(epoch0, GlobalBatchSampler(n, g, seed=8).permutation(0))


def test_sampler_resumes_the_same_stream() -> None:
    full = GlobalBatchSampler(41, 8, seed=3)
    full.set_position(2, 0)
    stream = list(full)
    part = GlobalBatchSampler(41, 8, seed=3)
    part.set_position(2, 3)
    assert list(part) == stream[3:] and len(part) == len(stream) - 3 == 2


def test_lr_schedules() -> None:
    assert [lr_factor(s, total=10, warmup=4, kind="constant") for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert lr_factor(4, total=10, warmup=4) == 1.0 and lr_factor(10, total=10, warmup=4) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(7, total=10, warmup=4) == pytest.approx(0.5)  # half-way through the cosine
    assert lr_factor(7, total=10, warmup=4, kind="linear", min_ratio=0.2) == pytest.approx(0.6)
    assert lr_factor(99, total=10, kind="cosine", min_ratio=0.1) == pytest.approx(0.1)


def test_float32_forward_keeps_ssm_math_in_float32_under_autocast() -> None:
    lin = torch.nn.Linear(8, 8)
    seen: list[torch.dtype] = []

    @float32_forward
    def ssm(x: torch.Tensor) -> torch.Tensor:
        seen.append(x.dtype)
        return lin(x)

    x = torch.randn(2, 5, 8)
    with autocast(torch.device("cpu"), torch.bfloat16):
        assert lin(x).dtype == torch.bfloat16  # autocast is really on
        y = ssm(lin(x))
        assert lin(x).dtype == torch.bfloat16  # and on again after the float32 island
    assert seen == [torch.float32] and y.dtype == torch.float32
    assert resolve_amp("auto", torch.device("cpu")) is None and resolve_amp("off", torch.device("cpu")) is None


def test_progress_lines_show_eta_without_a_terminal() -> None:
    out = io.StringIO()
    p = Progress(10, initial=2, stream=out, desc="train")
    p.advance(4)
    p.log({"loss": 0.5})
    p.close()
    line = out.getvalue().strip()
    assert line.startswith("train step 4/10 loss 0.5 eta ") and math.isfinite(p.eta_seconds() or math.nan)
    quiet = io.StringIO()
    q = Progress(10, enabled=False, stream=quiet)
    q.advance(3)
    q.log({"loss": 1.0})
    assert quiet.getvalue() == ""


def test_progress_bar_on_a_terminal() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Tty()
    p = Progress(8, stream=out, desc="train")
    p.advance(4)
    p.log({"loss": 0.25})
    p.advance(8)
    p.close()
    text = out.getvalue()
    assert "8/8" in text and "loss=0.25" in text and "<" in text  # tqdm's elapsed<remaining (ETA)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("amp", ["auto", "fp16", "off"])
def test_cuda_mixed_precision_trains(tmp_path: Path, amp: str) -> None:
    expected = {"auto": "bfloat16" if torch.cuda.is_bf16_supported() else "float16", "fp16": "float16", "off": "float32"}[amp]
    result = run(toy("train.steps=60", "train.eval_every=30", "train.device=cuda", f"train.amp={amp}"), tmp_path)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["precision"] == expected and summary["device"].startswith("cuda")
    assert all(p.dtype == torch.float32 for p in result.model.parameters())  # autocast never casts the weights
    assert result.last_eval is not None and result.last_eval["r2"] > 0.8, result.last_eval
