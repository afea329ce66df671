"""GPU mode of ``mambazoo bench kernels``: the traffic/floor arithmetic, the shape list, the target
checks, the exp-rate kernel (Triton interpreter, child process) and the CLI's no-CUDA exit; the
real run is a ``gpu``-marked smoke test on tiny shapes."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from mz_kernels.bench import main
from mz_kernels.bench_gpu import (
    GPU_SHAPES,
    GpuShape,
    check_targets,
    derived,
    floor_seconds,
    parse_gpu_shape,
    time_cuda,
    traffic,
)

# Hand-computed (see traffic's docstring), s = bytes per token element, params/state/grads fp32.
TRAFFIC_CASES = [
    pytest.param(
        # B=2 L=3 D=4 N=5 G=1 gated, bf16: tokens 24, B/C 2*2*3*5 = 60, params (20 + 8)*4 = 112,
        # final state 2*4*5*4 = 160, one checkpoint 160.
        # fwd = 4*24*2 + 60*2 + 112 + 160 = 584; bwd = 7*24*2 + 60*2 + 60*4 + 224 + 160 = 1080.
        GpuShape("t", "scan", 2, 3, 4, 5, 1, True), torch.bfloat16,
        {"fwd_bytes": 584, "fwdbwd_bytes": 584 + 160 + 1080, "fwd_exps": 120, "fwdbwd_exps": 480},
        id="scan-gated-bf16",
    ),
    pytest.param(
        # B=1 L=130 D=3 N=2 no gate, fp32: tokens 390, B/C 520, params 48, final 24, ceil(130/64)=3
        # checkpoints: 72. fwd = 3*390*4 + 520*4 + 48 + 24 = 6832; bwd = 5*390*4 + 2080 + 2080 + 96 + 72.
        GpuShape("t", "scan", 1, 130, 3, 2, 1, False), torch.float32,
        {"fwd_bytes": 6832, "fwdbwd_bytes": 6832 + 72 + 12128, "fwd_exps": 780, "fwdbwd_exps": 3120},
        id="scan-ungated-fp32-3ckpt",
    ),
    pytest.param(
        # SSD B=1 L=70 H=2 P=3 N=4 G=1 chunk 64, bf16: x 420, dt 140, B/C 560, params (4 + 6)*4 = 40,
        # states 1*2*2*3*4*4 = 192. fwd = 3*420*2 + 140*2 + 560*2 + 40 + 2*192 = 4344;
        # bwd = 5*420*2 + 2*140*2 + 560*2 + 560*4 + 80 + 3*192 = 8776; exps 140*65.
        GpuShape("t", "ssd", 1, 70, 6, 4, 1, True, 2, 3, 64), torch.bfloat16,
        {"fwd_bytes": 4344, "fwdbwd_bytes": 4344 + 8776, "fwd_exps": 9100, "fwdbwd_exps": 27300},
        id="ssd-gated-bf16",
    ),
]


@pytest.mark.parametrize("shape, dtype, want", TRAFFIC_CASES)
def test_traffic_hand_computed(shape, dtype, want):
    assert traffic(shape, dtype) == want


def test_traffic_rejects_bad_dtype_and_kind():
    with pytest.raises(ValueError, match="traffic: dtype"):
        traffic(GPU_SHAPES["eeg"], torch.float64)
    with pytest.raises(ValueError, match="traffic: shape.kind"):
        traffic(GpuShape("t", "conv", 1, 2, 3, 4), torch.float32)


def test_backward_moves_about_twice_the_forward_bytes():
    # The reference's estimate ("backward moves ~2x the forward bytes"), for the N = 16 shapes.
    for name in ("vim_s_bi", "eeg", "audio", "segmamba_3d"):
        t = traffic(GPU_SHAPES[name])
        assert 1.5 < (t["fwdbwd_bytes"] - t["fwd_bytes"]) / t["fwd_bytes"] < 3.0, name


def test_floor_and_derived():
    assert floor_seconds(1e9, 1e9, 2e12, 1e12) == pytest.approx(1e-3)  # exp-bound
    assert floor_seconds(3e9, 1e9, 2e12, 1e12) == pytest.approx(1.5e-3)  # memory-bound
    with pytest.raises(ValueError, match="rates must be > 0"):
        floor_seconds(1.0, 1.0, 0.0, 1.0)
    row = {"fwd_bytes": 4e9, "fwd_exps": 1e9, "fwd_s": 4e-3, "fwdbwd_bytes": 9e9, "fwdbwd_exps": 4e9, "fwdbwd_s": 9e-3}
    d = derived(row, 2e12, 1e12)
    assert d["fwd_floor_s"] == pytest.approx(2e-3) and d["fwd_floor_frac"] == pytest.approx(0.5)
    assert d["fwd_bytes_per_s"] == pytest.approx(1e12)
    assert d["fwdbwd_floor_s"] == pytest.approx(4.5e-3) and d["fwdbwd_floor_frac"] == pytest.approx(0.5)


@pytest.mark.parametrize(
    "name, frac, ratio, xc, want",
    [
        ("vmamba_t_s1", 0.5, 4.0, 10.0, [True, True, True, True]),
        ("vmamba_t_s1", 0.49, 4.1, 9.9, [False, False, False, False]),
        ("eeg", 0.41, 3.0, 12.0, [True, True, True, True]),
        ("vim_s_bi", 0.39, 2.0, 3.0, [False, True]),  # L = 197 < 1024: no chunked target
    ],
    ids=["n1-at-bounds", "n1-just-missed", "n16-met", "short-L"],
)
def test_check_targets(name, frac, ratio, xc, want):
    row = {"fwd_floor_frac": frac, "fwd_s": 1.0, "fwdbwd_s": ratio, "x_chunked_fwd": xc, "x_chunked_fwdbwd": xc}
    assert [met for _, met in check_targets(GPU_SHAPES[name], row)] == want


def test_gpu_shape_list_matches_reference_table():
    want = {  # (B, D_total, L, N, G) from the reference table
        "vmamba_t_s1": (64, 384, 3136, 1, 4), "vmamba_t_s3": (64, 1536, 196, 1, 4), "vim_s_bi": (64, 1536, 197, 16, 2),
        "segmamba_3d": (2, 576, 32768, 16, 3), "eeg": (32, 128, 2048, 16, 1), "audio": (8, 1536, 8192, 16, 1),
        "ssd": (8, 24 * 64, 2048, 128, 1),
    }
    got = {n: (s.batch, s.dim, s.length, s.d_state, s.groups) for n, s in GPU_SHAPES.items()}
    assert got == want
    for name, s in GPU_SHAPES.items():
        assert parse_gpu_shape(name) is s and s.dim % s.groups == 0
        assert traffic(s)["fwd_bytes"] > 0
    assert (GPU_SHAPES["ssd"].heads, GPU_SHAPES["ssd"].headdim, GPU_SHAPES["ssd"].chunk) == (24, 64, 64)


def test_parse_custom_gpu_shapes():
    s = parse_gpu_shape("2x67x33x4x3")
    assert (s.kind, s.batch, s.length, s.dim, s.d_state, s.groups) == ("scan", 2, 67, 33, 4, 3)
    t = parse_gpu_shape("ssd:1x80x6x16x8x3")
    assert (t.kind, t.length, t.heads, t.headdim, t.dim, t.d_state, t.groups) == ("ssd", 80, 6, 16, 96, 8, 3)
    for bad, msg in [("2x67x33x4x2", "D = 33 must be divisible by G = 2"), ("ssd:1x8x5x4x2x2", "H = 5"),
                     ("ssd:1x8x4x2", "ssd:BxLxHxPxN"), ("2x0x3x4", "BxLxDxN"), ("nope", "BxLxDxN")]:
        with pytest.raises(ValueError, match=msg.replace("(", r"\(")):
            parse_gpu_shape(bad)


def test_time_cuda_validates_before_touching_cuda():
    with pytest.raises(ValueError, match="repeat must be a positive int, got 0"):
        time_cuda(lambda: None, repeat=0, warmup=1, flush_bytes=0)
    with pytest.raises(ValueError, match="warmup must be an int >= 0, got -1"):
        time_cuda(lambda: None, repeat=3, warmup=-1, flush_bytes=0)
    with pytest.raises(ValueError, match="flush_bytes must be an int >= 0"):
        time_cuda(lambda: None, repeat=3, warmup=0, flush_bytes=-5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
@pytest.mark.parametrize("extra", [[], ["--shapes", "eeg"], ["--shapes", "bogus"]], ids=["default", "named", "bad-shape"])
def test_cuda_without_cuda_exits_2(extra, capsys):
    assert main(["--device", "cuda", *extra]) == 2
    out = capsys.readouterr().out.strip().splitlines()
    assert out == ["bench kernels: --device cuda requested but CUDA is not available"]


_CHILD = """
import json, sys, torch
from mz_kernels.bench_gpu import exp_chain
x = -0.5 * torch.rand(37, generator=torch.Generator().manual_seed(3))
print(json.dumps({"x": x.tolist(), "out": exp_chain(x, 5).tolist()}))
"""


def test_exp_chain_kernel_in_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    x = torch.tensor(res["x"], dtype=torch.float64)
    acc = torch.zeros_like(x)
    for _ in range(5):
        x = -0.5 * torch.exp2(x)
        acc += x
    assert torch.allclose(torch.tensor(res["out"], dtype=torch.float64), acc, rtol=1e-5)


@pytest.mark.gpu
def test_gpu_mode_smoke(tmp_path, capsys):
    path = tmp_path / "gpu.json"
    args = ["--device", "cuda", "--shapes", "2x1100x32x4x2,ssd:1x80x2x16x16", "--repeat", "3", "--warmup", "1",
            "--flush-mb", "8", "--json", str(path)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "bfloat16 inputs, float32 state" in out and "% floor" in out and "targets (triton):" in out
    report = json.loads(path.read_text())
    assert report["copy_bytes_per_s"] > 1e10 and report["exp_per_s"] > report["torch_exp_per_s"] > 0
    rows = {(r["shape"], r["backend"]): r for r in report["rows"]}
    assert len(rows) == 4 and all(r["status"] == "ok" for r in rows.values())
    tri = rows[("2x1100x32x4x2", "triton")]
    assert 0 < tri["fwd_floor_frac"] and tri["x_chunked_fwd"] > 0 and tri["peak_fwdbwd_bytes"] > 0
    assert len(tri["targets"]) == 4  # L = 1100 >= 1024: floor, f+b/fwd, and both chunked ratios


def test_format_gpu_table_from_model_rows():
    from mz_kernels.bench_gpu import format_gpu_table

    shape = GPU_SHAPES["eeg"]
    rows = []
    for backend, fwd_s in (("triton", 2e-4), ("chunked", 3e-3)):
        row = {"shape": "eeg", "backend": backend, "status": "ok", "fwd_s": fwd_s, "fwdbwd_s": 5 * fwd_s,
               "peak_fwdbwd_bytes": 3 << 20, **traffic(shape)}
        row.update(derived(row, 4e12, 3e12))
        rows.append(row)
    rows[0]["x_chunked_fwd"], rows[0]["x_chunked_fwdbwd"] = 15.0, 15.0
    rows[0]["targets"] = [[t, m] for t, m in check_targets(shape, rows[0])]
    rows.append({"shape": "ssd", "backend": "triton", "status": "error: RuntimeError: boom"})
    report = {"dtype": "bfloat16", "device": "X", "torch": "2", "copy_bytes_per_s": 4e12, "exp_per_s": 3e12,
              "torch_exp_per_s": 5e11, "rows": rows}
    lines = format_gpu_table(report).splitlines()
    assert lines[0].startswith("bfloat16 inputs, float32 state")
    tri = next(l for l in lines if l.startswith("eeg           triton"))
    assert tri.split()[2:5] == ["0.200", "1.000", "5.00"] and tri.split()[-2:] == ["15.0", "3"]
    assert "ssd           triton     error: RuntimeError: boom" in lines
    assert "  eeg           f+b/fwd 5.00 <= 4: MISSED" in lines and "  eeg           fwd 15.0x chunked >= 10x (L=2048): met" in lines
