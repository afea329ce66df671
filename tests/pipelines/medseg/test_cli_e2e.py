"""End to end through the ``mambazoo medseg`` verbs, with the CLI defaults: synth -> train ->
evaluate -> predict -> export, in 3D (SegMamba-style) and 2D (VM-UNet-style); and user errors."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from mz_pipelines.cli import main


def _cli(*argv: str) -> int:
    return main(["medseg", *argv])


def _baseline(task: Path) -> float:
    from mz_pipelines.medseg.dataset_json import read_task
    from mz_pipelines.medseg.synth import threshold_baseline

    return float(threshold_baseline(read_task(task), "validation")["dice"])


def _end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dims: int) -> None:
    import nibabel as nib

    monkeypatch.chdir(tmp_path)
    task = Path("data/task")
    assert _cli("synth", "--out", str(task), "--dims", str(dims)) == 0
    assert _cli("train", "--set", f"data.path={task}", "run.name=e2e", "--quiet") == 0
    assert _cli("evaluate", "--set", "run.name=e2e", "--quiet") == 0
    summary = json.loads(Path("runs/medseg/e2e/eval_validation/summary.json").read_text())
    dice = summary["foreground"]["dice_mean"]
    base = _baseline(task)
    print(f"\n{dims}D: sliding-window Dice {dice:.3f}, best-threshold baseline {base:.3f}")
    assert dice > 0.80, summary
    assert dice - base > 0.5, (dice, base)
    # held-out volumes are larger than the training patches
    config = json.loads(json.dumps(__import__("yaml").safe_load(Path("runs/medseg/e2e/config.yaml").read_text())))
    image = sorted(Path(task, "imagesTs").glob("*.nii.gz"))[0]
    src = nib.load(str(image))
    assert min(src.shape[:dims]) > max(config["data"]["roi"])
    assert _cli("predict", "--set", "run.name=e2e", "--input", str(image), "--output", "pred") == 0
    masks = list(Path("pred").glob("*_seg.nii.gz"))
    assert len(masks) == 1
    out = nib.load(str(masks[0]))
    assert out.shape == src.shape
    np.testing.assert_allclose(out.affine, src.affine, atol=1e-5)
    volumes = json.loads(next(Path("pred").glob("*_volumes.json")).read_text())
    assert volumes  # per-label volumes in mL
    assert _cli("export", "--set", "run.name=e2e", "--out", "bundle") == 0
    for f in ("configs/metadata.json", "configs/inference.json", "models/model.pt"):
        assert Path("bundle", f).is_file()


@pytest.mark.slow
def test_3d_segmamba_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _end_to_end(tmp_path, monkeypatch, 3)


@pytest.mark.slow
def test_2d_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _end_to_end(tmp_path, monkeypatch, 2)


@pytest.fixture(scope="module")
def small_task(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mz_pipelines.medseg.synth import write_task

    root = tmp_path_factory.mktemp("task")
    write_task(root, n_train=3, n_val=2, n_test=1, size=24, spatial_dims=3, seed=1)
    return root


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _first_case(task: Path) -> tuple[Path, Path, str]:
    meta = json.loads((task / "dataset.json").read_text())
    entry = meta["training"][0]
    image = task / (entry["image"][0] if isinstance(entry["image"], list) else entry["image"])
    label = task / entry["label"]
    return image, label, label.name.split(".")[0]


@pytest.mark.parametrize("damage", ["truncated", "garbage", "label-values", "shape-mismatch"])
def test_bad_task_is_one_line_naming_the_case(small_task: Path, tmp_path: Path, damage: str, capsys, monkeypatch) -> None:
    import nibabel as nib

    monkeypatch.chdir(tmp_path)
    task = _copy(small_task, tmp_path / "task")
    image, label, case = _first_case(task)
    if damage == "truncated":
        data = image.read_bytes()
        image.write_bytes(gzip.compress(gzip.decompress(data)[: len(gzip.decompress(data)) // 2]))
    elif damage == "garbage":
        image.write_bytes(b"not a nifti file at all")
    elif damage == "label-values":
        lab = nib.load(str(label))
        arr = np.asarray(lab.dataobj).copy()
        arr.flat[0] = 7
        nib.save(nib.Nifti1Image(arr, lab.affine), str(label))
    else:
        lab = nib.load(str(label))
        arr = np.asarray(lab.dataobj)[:-2]
        nib.save(nib.Nifti1Image(arr, lab.affine), str(label))
    code = _cli("train", "--set", f"data.path={task}", "train.steps=2", "train.warmup_steps=0", "--quiet")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and case in err[0], err
    assert "Traceback" not in err[0]


def test_task_and_config_mismatch_errors(small_task: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert _cli("train", "--set", f"data.path={small_task}", "data.roi=32,32", "--quiet") == 2
    assert "3D but data.roi" in capsys.readouterr().err
    assert _cli("train", "--set", f"data.path={small_task}", "data.roi=20,20,20", "--quiet") == 2
    assert "must be a multiple of 8" in capsys.readouterr().err
    assert _cli("train", "--set", f"data.path={small_task}", "model.name=vmunet", "--quiet") == 2
    assert "spatial_dims" in capsys.readouterr().err
    assert _cli("evaluate", "--set", "run.name=nothing") == 2
    assert "no trained model" in capsys.readouterr().err
