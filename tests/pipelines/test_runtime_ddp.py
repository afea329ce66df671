"""DistributedDataParallel for real: `train` under torchrun with 2 gloo processes on CPU equals the
single-process run with the same global batch, and only rank 0 writes."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from mz_pipelines.runtime.checkpoint import load_checkpoint
from mz_pipelines.runtime.config import resolve_config
from mz_pipelines.runtime.engine import train
from mz_pipelines.runtime.metrics import read_metrics
from mz_pipelines.runtime.rundir import RunDir
from mz_pipelines.toy.config import ToyConfig
from mz_pipelines.toy.task import build_task

# Global batch 16 = 2 ranks x 8; 5 steps per epoch, so the run crosses epoch boundaries.
SETTINGS = [
    "data.n_train=80", "data.n_val=24", "data.length=10", "model.width=6", "train.batch_size=16",
    "train.steps=24", "train.log_every=4", "train.eval_every=8", "train.checkpoint_every=10", "train.warmup_steps=2",
]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_equal_one_process(tmp_path: Path) -> None:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
        "--master_addr=127.0.0.1", f"--master_port={free_port()}",
        "-m", "mz_pipelines.toy", "train", "--quiet", "--set", *SETTINGS, f"run.root={tmp_path}", "run.name=ddp",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("completed at step 24;") == 1  # only rank 0 reports

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = resolve_config(ToyConfig, overrides=[*SETTINGS, f"run.root={tmp_path}", "run.name=single"])
        single = train(lambda: build_task(cfg), cfg.train, run_dir=RunDir.for_config(cfg.run, "toy"), config=cfg, quiet=True)
    finally:
        torch.set_num_threads(threads)

    ddp_dir = tmp_path / "toy" / "ddp"
    ckpt = load_checkpoint(ddp_dir / "checkpoint.pt")
    assert ckpt["world_size"] == 2 and len(ckpt["ranks"]) == 2 and ckpt["step"] == 24
    for k, v in single.model.state_dict().items():
        assert torch.allclose(ckpt["model"][k], v, rtol=1e-5, atol=1e-6), (k, (ckpt["model"][k] - v).abs().max())

    # Logged losses are averaged over ranks: they match the single-process log.
    ddp_log, single_log = read_metrics(ddp_dir / "metrics.jsonl"), read_metrics(tmp_path / "toy" / "single" / "metrics.jsonl")
    assert [(r["split"], r["step"]) for r in ddp_log] == [(r["split"], r["step"]) for r in single_log]  # each line once
    for a, b in zip(ddp_log, single_log):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * max(1.0, abs(b["loss"])), (a, b)

    # Rank 0 alone wrote the folder: exactly the run files, no leftovers of concurrent writers.
    expected = ["best.pt", "checkpoint.pt", "config.yaml", "figures", "metrics.jsonl", "summary.json"]
    assert sorted(p.name for p in ddp_dir.iterdir()) == expected
