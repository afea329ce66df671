"""The command line: `mambazoo` and `python -m mz_pipelines.toy`, their one-line user errors
(exit 2, traceback only with --debug), and a synth -> train -> evaluate -> predict -> bench round."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from mz_pipelines import cli
from mz_pipelines.runtime.checkpoint import load_checkpoint
from mz_pipelines.toy.cli import DOMAIN
from mz_pipelines.toy.model import ToySSM

MAMBAZOO = str(Path(sys.executable).with_name("mambazoo"))
TOY = [sys.executable, "-m", "mz_pipelines.toy"]
SMALL = ["data.n_train=64", "data.n_val=32", "data.length=12", "model.width=5", "train.batch_size=16", "train.warmup_steps=0"]


def sh(*cmd: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), capture_output=True, text=True, cwd=cwd, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["tyo", "train"], "error: unknown command 'tyo' (did you mean 'toy'?); expected one of ['info', 'bench', "),
        (["toy", "trian"], "error: mambazoo toy: unknown verb 'trian' (did you mean 'train'?)"),
        (["toy", "train", "--bogus"], "error: mambazoo toy: unrecognized arguments: --bogus (see --help)"),
        (["toy", "train", "--set", "train.lr_max=0.1"], "error: --set: unknown config key 'train.lr_max' (did you mean 'train.lr'?)"),
        (["toy", "train", "--set", "train.steps=many"], "error: --set: config key 'train.steps' expects int, got 'many'"),
        (["toy", "train", "--set", "data.n_train=0"], "error: invalid config: data.n_train must be >= 1, got 0"),
        (["toy", "train", "--config", "missing.yaml"], "error: config file not found: missing.yaml"),
        (
            ["toy", "train", "--resume", "--overwrite"],
            "error: mambazoo toy train: argument --overwrite: not allowed with argument --resume (see --help)",
        ),
        (["toy", "evaluate", "--set", "run.name=nothing"], "error: no trained model in runs/toy/nothing"),
        (["toy", "predict", "--input", "nope.npy"], "error: input file not found: nope.npy"),
        (["toy", "predict", "--input", "x.npy", "--output", "y.csv"], "error: --output must end in .npy, got y.csv"),
        (["bench", "toyy"], "error: unknown bench target 'toyy' (did you mean 'toy'?); expected one of ['kernels', "),
        (["bench", "toy", "--repeat", "0"], "error: mambazoo bench toy: argument --repeat: expected an integer >= 1, got 0 (see --help)"),
        ([], "error: mambazoo: the following arguments are required: COMMAND (see --help)"),
    ],
    ids=[
        "command", "verb", "option", "config-key", "config-type", "config-check", "config-file",
        "exclusive", "no-run", "no-input", "output-format", "bench-target", "bench-option", "empty",
    ],
)
def test_user_mistakes_exit_2_with_one_line(tmp_path: Path, argv: list[str], message: str) -> None:
    proc = sh(MAMBAZOO, *argv, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(message), proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stdout == ""


def test_yaml_errors_name_the_file(tmp_path: Path) -> None:
    (tmp_path / "exp.yaml").write_text("train:\n  steps: [1\n")
    proc = sh(*TOY, "train", "--config", "exp.yaml", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.startswith("error: config file 'exp.yaml': invalid YAML at line 3"), proc.stderr
    (tmp_path / "exp.yaml").write_text("train:\n  lr_max: 0.1\n")
    proc = sh(*TOY, "train", "--config", "exp.yaml", cwd=tmp_path)
    assert proc.stderr == "error: config file 'exp.yaml': unknown config key 'train.lr_max' (did you mean 'train.lr'?)\n"


@pytest.mark.parametrize(
    "content, message",
    [
        (np.zeros((4, 5), np.float32), "x.npy: expected x of shape [N, L, 3], got (4, 5)"),
        (np.zeros((2, 6, 3), np.int64), "x.npy: expected floating-point x, got dtype int64"),
        (b"hello", "x.npy: not a NumPy .npy file"),
    ],
    ids=["shape", "dtype", "not-npy"],
)
def test_bad_input_files_for_predict(tmp_path: Path, content: object, message: str) -> None:
    if isinstance(content, bytes):
        (tmp_path / "x.npy").write_bytes(content)
    else:
        np.save(tmp_path / "x.npy", content)
    proc = sh(*TOY, "predict", "--input", "x.npy", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.startswith(f"error: {message}"), proc.stderr
    assert proc.stderr.count("\n") == 1


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    proc = sh(MAMBAZOO, "toy", "train", "--set", "train.lr_max=1", "--debug", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith("Traceback (most recent call last)") and "UserError" in proc.stderr
    assert proc.stderr.rstrip().splitlines()[-1] == "error: --set: unknown config key 'train.lr_max' (did you mean 'train.lr'?)"
    lead = sh(MAMBAZOO, "--debug", "toy", "trian", cwd=tmp_path)
    assert lead.returncode == 2 and lead.stderr.startswith("Traceback")


def test_help_and_print_config(tmp_path: Path) -> None:
    top = sh(MAMBAZOO, "--help")
    assert top.returncode == 0 and "toy" in top.stdout and "bench" in top.stdout
    toy_help = sh(*TOY, "--help")
    assert toy_help.returncode == 0 and all(v in toy_help.stdout for v in ("synth", "train", "evaluate", "predict", "bench"))
    (tmp_path / "exp.yaml").write_text("model: {width: 9}\ntrain: {steps: 11}\n")
    proc = sh(MAMBAZOO, "toy", "train", "--config", "exp.yaml", "--set", "train.steps=12", "--print-config", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    cfg = yaml.safe_load(proc.stdout)
    assert (cfg["model"]["width"], cfg["train"]["steps"], cfg["train"]["lr"]) == (9, 12, 0.02)  # defaults < YAML < --set


def test_info_still_works(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "kernel backends:" in out


@pytest.mark.skipif(importlib.util.find_spec("mz_kernels.bench") is None, reason="mz_kernels.bench not written yet")
def test_bench_kernels_is_passed_through(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:  # its own argparse answers --help
        cli.main(["bench", "kernels", "--help"])
    assert e.value.code == 0 and "mambazoo bench kernels" in capsys.readouterr().out


def test_synth_train_evaluate_predict_bench(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], one_thread: None
) -> None:
    monkeypatch.chdir(tmp_path)
    assert cli.main(["toy", "synth", "--out", "data", "--set", *SMALL]) == 0
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["meta.json", "train.npz", "val.npz"]
    assert capsys.readouterr().out.splitlines() == ["data/train.npz", "data/val.npz", "data/meta.json"]

    train = ["toy", "train", "--quiet", "--set", *SMALL, "data.path=data", "run.name=a", "train.steps=100", "train.eval_every=25"]
    assert cli.main(train) == 0
    assert capsys.readouterr().out.startswith("completed at step 100; best loss")
    run = tmp_path / "runs" / "toy" / "a"
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["width"] == 5

    # evaluate/predict start from the run's saved config: model.width=5 need not be repeated.
    assert DOMAIN.main(["evaluate", "--set", "run.name=a"]) == 0
    out = capsys.readouterr().out
    report = json.loads((run / "eval_val.json").read_text())
    best = load_checkpoint(run / "best.pt")
    assert report["metrics"]["loss"] == pytest.approx(best["metrics"]["loss"], rel=1e-6)  # same weights, same data
    assert report["metrics"]["r2"] > 0.9 and f"{report['metrics']['r2']:.6f}"[:6] in out

    assert cli.main(["toy", "predict", "--set", "run.name=a", "--input", "data/val.npz", "--output", "pred.npy"]) == 0
    pred = np.load(tmp_path / "pred.npy")
    model = ToySSM(3, 5)
    model.load_state_dict(best["model"])
    with np.load(tmp_path / "data" / "val.npz") as z, torch.no_grad():
        expected = model(torch.from_numpy(z["x"])).numpy()
    assert pred.shape == (32, 12, 1) and np.allclose(pred, expected, atol=1e-6)

    assert cli.main(["toy", "evaluate", "--set", "run.name=a", "model.width=7"]) == 2
    assert "does not match the model built from the config" in capsys.readouterr().err

    assert cli.main(["bench", "toy", "--lengths", "9", "--warmup", "0", "--repeat", "2", "--json", "bench.json"]) == 0
    table = capsys.readouterr().out
    assert "L=9" in table and "x loop" in table
    results = json.loads((tmp_path / "bench.json").read_text())["results"]
    assert [r["name"] for r in results] == ["loop", "conv"] and results[0]["ratio_to_baseline"] == 1.0
    assert results[1]["ratio_to_baseline"] == pytest.approx(results[1]["median_ms"] / results[0]["median_ms"])
