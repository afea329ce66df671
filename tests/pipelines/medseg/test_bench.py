"""``mambazoo medseg bench`` on tiny presets: the table, ratios, scaling exponents, JSON, PNG, memory subprocess."""
from __future__ import annotations

import json
import math
from pathlib import Path

from mz_pipelines.cli import main
from mz_pipelines.medseg.bench import fit_exponent


def test_fit_exponent_recovers_power_laws() -> None:
    vox = [16.0**3, 24.0**3, 32.0**3]
    assert math.isclose(fit_exponent(vox, [3 * v for v in vox]), 1.0)
    assert math.isclose(fit_exponent(vox, [v**2 for v in vox]), 2.0)
    assert fit_exponent(vox[:1], [1.0]) is None


def test_bench_tiny_models(tmp_path: Path, capsys) -> None:
    out_json, out_png = tmp_path / "b.json", tmp_path / "b.png"
    code = main([
        "medseg", "bench", "--models", "segmamba:tiny", "unet:tiny", "--baseline", "unet:tiny",
        "--sizes", "16", "32", "--threads", "1", "--warmup", "0", "--repeat", "1",
        "--json", str(out_json), "--plot", str(out_png), "--quiet", "--breakdown", "1",
    ])
    text = capsys.readouterr().out
    assert code == 0
    assert "segmamba:tiny" in text and "scaling exponent" in text
    report = json.loads(out_json.read_text())
    rows = {(r["model"], r["size"]): r for r in report["rows"]}
    assert set(rows) == {("segmamba:tiny", 16), ("segmamba:tiny", 32), ("unet:tiny", 16), ("unet:tiny", 32)}
    seg = rows[("segmamba:tiny", 32)]
    assert seg["scan_gflops"] > 0 and rows[("unet:tiny", 32)]["scan_gflops"] == 0
    assert seg["infer_mem_MiB"] is not None and seg["train_mem_MiB"] > 0
    assert rows[("unet:tiny", 32)]["infer_ms_x"] == 1.0
    # FLOPs of these conv/scan networks grow linearly with the voxel count
    assert abs(report["scaling"]["segmamba:tiny"]["gflops"] - 1.0) < 0.05
    assert out_png.stat().st_size > 1000
    # where the training memory goes, per top-level module, at the smallest size
    bd = report["breakdown"]
    assert bd["size"] == 16 and bd["depth"] == 1 and set(bd["models"]) == {"segmamba:tiny", "unet:tiny"}
    seg_bd = bd["models"]["segmamba:tiny"]
    assert seg_bd["total_MiB"] == sum(seg_bd["modules_MiB"].values()) > 0
    assert {"encoder", "encoder1", "decoder1"} <= set(seg_bd["modules_MiB"])
    assert "saved for backward in one training forward at 16^3" in text


def test_bench_rejects_bad_sizes(capsys) -> None:
    assert main(["medseg", "bench", "--models", "segmamba:tiny", "--baseline", "segmamba:tiny", "--sizes", "20", "--no-memory"]) == 2
    assert "not a multiple of the stride" in capsys.readouterr().err
    assert main(["medseg", "bench", "--models", "segmambo"]) == 2
    assert "unknown model" in capsys.readouterr().err


def test_bench_checkpointed_rows(tmp_path: Path, capsys) -> None:
    out_json = tmp_path / "b.json"
    code = main([
        "medseg", "bench", "--models", "segmamba:tiny", "unet:tiny", "--baseline", "unet:tiny", "--sizes", "16",
        "--threads", "1", "--warmup", "0", "--repeat", "1", "--use-checkpoint", "both", "--no-memory",
        "--json", str(out_json), "--quiet",
    ])
    assert code == 0 and "segmamba:tiny+ckpt" in capsys.readouterr().out
    report = json.loads(out_json.read_text())
    assert [r["model"] for r in report["rows"]] == ["segmamba:tiny", "segmamba:tiny+ckpt", "unet:tiny"]
    assert report["meta"]["use_checkpoint"] == "both"
    ck = report["rows"][1]
    assert ck["train_ms"] > 0 and ck["train_ms_x"] == ck["train_ms"] / report["rows"][2]["train_ms"]
