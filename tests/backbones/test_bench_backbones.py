"""``mambazoo bench backbones``: FLOP counting with the analytic scan term, the report, and the CLI."""
from __future__ import annotations

import json
import re

import pytest
import torch

from mz_backbones import create_backbone
from mz_backbones.bench import (
    baseline_for,
    build_model,
    count_flops,
    main,
    peak_memory_cpu,
    round_robin_latency,
)
from mz_backbones.layers.ssm import SelectiveSSM

pytest.importorskip("torchvision", reason="the transformer baselines need torchvision")


def _ssm_lengths(name: str, res: int) -> dict[str, int]:
    """The sequence length each SelectiveSSM of the model must see at ``res`` x ``res``, from the
    model's declared structure (not from running it)."""
    model = create_backbone(name)
    lengths = {}
    for n, m in model.named_modules():
        if not isinstance(m, SelectiveSSM):
            continue
        if name.startswith("vim"):  # plain: all patches plus the middle class token
            lengths[n] = (res // 16) ** 2 + 1
        else:  # hierarchical: stage i runs at feature_info[i]'s reduction
            stage = int(re.search(r"layers\.(\d+)\.", n).group(1))
            lengths[n] = (res // model.feature_info[stage]["reduction"]) ** 2
    return lengths


@pytest.mark.parametrize("name,res", [("vim_test", 64), ("vmamba_test", 96)], ids=["vim_test-64", "vmamba_test-96"])
def test_flops_replace_the_scan_with_its_analytic_count(name, res):
    torch.manual_seed(0)
    model = create_backbone(name, img_size=res).eval()
    ssms = dict((n, m) for n, m in model.named_modules() if isinstance(m, SelectiveSSM))
    expect_ssm = sum(ssms[n].flops(1, L) for n, L in _ssm_lengths(name, res).items())
    f = count_flops(model, torch.randn(1, 3, res, res))
    assert len(ssms) >= 2 and f["ssm_analytic"] == expect_ssm
    assert 0 < f["ssm_counted"] < f["counted"]  # the projection einsums were seen, the scan was not
    assert f["total"] == f["counted"] - f["ssm_counted"] + f["ssm_analytic"]
    assert f["ssm_analytic"] > f["ssm_counted"]  # the scan itself adds work the counter cannot see


def test_vit_flops_include_attention():
    """DeiT-Tiny shape at 64x64 (16 patches + cls): the count matches the closed form, attention included."""
    model = build_model("deit_tiny", 64).eval()
    t, d, blocks = 17, 192, 12
    macs = 16 * (16 * 16 * 3) * d  # patch embedding
    macs += blocks * (t * (4 * d * d + 2 * d * 768) + 2 * t * t * d)  # qkv + proj + mlp, q@k and attn@v
    macs += d * 1000  # classifier on the class token
    assert count_flops(model, torch.randn(1, 3, 64, 64))["total"] == 2 * macs


def test_flops_grow_linearly_for_vim():
    m64 = create_backbone("vim_test", img_size=64).eval()
    m128 = create_backbone("vim_test", img_size=128).eval()
    f64 = count_flops(m64, torch.randn(1, 3, 64, 64))["total"]
    f128 = count_flops(m128, torch.randn(1, 3, 128, 128))["total"]
    assert 3.5 < f128 / f64 < 4.05  # 65 vs 17 tokens: linear, not quadratic


def test_baseline_pairing():
    assert baseline_for("vim_tiny") == "deit_tiny"
    assert baseline_for("vmamba_tiny_s1l8") == "swin_t"
    assert baseline_for("plainmamba_l1") is None


def test_bench_smoke_report_table_and_plot(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--models", "vim_test,vmamba_test", "--resolutions", "32,48", "--repeat", "2", "--threads", "1",
            "--no-memory", "--out", str(out), "--json", str(tmp_path / "r.json")]
    assert main(argv) == 0
    text = capsys.readouterr().out
    report = json.loads((tmp_path / "r.json").read_text())
    assert json.loads((out / "backbones.json").read_text()) == report
    assert (out / "backbones.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = {(r["model"], r["resolution"]): r for r in report["rows"]}
    assert list(dict.fromkeys(r["model"] for r in report["rows"])) == ["vim_test", "deit_tiny", "vmamba_test", "swin_t"]
    assert rows[("vmamba_test", 48)]["status"].startswith("skipped: resolution 48 is not a multiple of the stride 32")
    for key, r in rows.items():
        if key == ("vmamba_test", 48):
            continue
        assert r["status"] == "ok", r
        assert r["params"] > 0 and r["flops"]["total"] > 0 and 0 < r["latency_s"] <= max(r["latency_times_s"])
        assert 1 <= len(r["latency_times_s"]) <= 2
    for name in ("vim_test", "vmamba_test"):
        r, b = rows[(name, 32)], rows[(baseline_for(name), 32)]
        assert r["latency_ratio"] == pytest.approx(r["latency_s"] / b["latency_s"])
    assert rows[("swin_t", 32)]["params"] == pytest.approx(28.3e6, rel=0.01)
    assert rows[("deit_tiny", 32)]["params"] == pytest.approx(5.7e6, rel=0.01)
    assert "vim_test" in text and "deit_tiny" in text and "skipped" in text


def test_models_are_timed_in_turns():
    """A model and its baseline are timed alternately (same machine state), warm-up rounds untimed;
    the budget ends the run after a whole round."""
    import time

    calls: list[str] = []

    def make(name: str, seconds: float):
        def fn() -> None:
            calls.append(name)
            time.sleep(seconds)

        return fn

    cpu = torch.device("cpu")
    times = round_robin_latency({"a": make("a", 0.0), "b": make("b", 0.0)}, repeat=3, warmup=1, budget=10.0, device=cpu)
    assert calls == ["a", "b"] * 4 and [len(t) for t in times.values()] == [3, 3]
    calls.clear()
    times = round_robin_latency({"a": make("a", 0.0), "b": make("b", 0.03)}, repeat=50, warmup=0, budget=0.05, device=cpu)
    assert calls == ["a", "b"] * 2 and all(len(t) == 2 for t in times.values())
    assert min(times["b"]) >= 0.03 > max(times["a"])


def test_memory_is_measured_in_a_subprocess_and_grows_with_the_input():
    small = peak_memory_cpu("vmamba_test", 64, 1, 1)
    large = peak_memory_cpu("vmamba_test", 384, 1, 1)
    assert large["peak_bytes"] > small["peak_bytes"]
    # the stage-1 activations alone: 96^2 tokens x 16 channels x 4 bytes, several such tensors live at once
    assert large["peak_bytes"] > 96 * 96 * 16 * 4


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--resolutions", "0"], "--resolutions must be a comma list of positive ints"),
        (["--resolutions", "a,b"], "--resolutions must be a comma list of positive ints"),
        (["--models", "vim_nope"], "unknown --models ['vim_nope']"),
        (["--repeat", "0"], "--repeat must be >= 1"),
        (["--budget", "0"], "--budget must be > 0"),
    ],
    ids=["zero-res", "text-res", "unknown-model", "repeat", "budget"],
)
def test_bad_options_exit_2(argv, message, capsys, tmp_path):
    assert main([*argv, "--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().out
