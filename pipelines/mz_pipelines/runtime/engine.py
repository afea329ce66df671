"""The training engine: one loop for every domain, in one process or under ``torchrun`` (DDP).

A domain plugs in a :class:`TrainTask` (model, datasets, loss, evaluation) through a factory that
the engine calls after seeding, so model initialisation is reproducible. The engine owns the rest:
device, AMP (CUDA only), AdamW, warm-up + cosine schedule, gradient clipping, the resumable global
batch sampler, evaluation every ``eval_every`` steps, best-checkpoint tracking, early stop,
``metrics.jsonl``, checkpoints, ``summary.json`` and PNG curves. Only rank 0 writes files.

Examples:
    >>> result = train(lambda: build_task(cfg), cfg.train, run_dir=RunDir.for_config(cfg.run, "toy"), config=cfg)
    >>> result.stopped, result.step
    ('completed', 1000)
"""
from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset

from .checkpoint import load_checkpoint, load_model_weights, save_checkpoint
from .config import config_to_dict, save_config
from .distributed import DistEnv, barrier, gather_objects, init_distributed, mean_across, shutdown
from .errors import UserError
from .files import write_json
from .metrics import MetricsLogger, read_metrics
from .optim import build_optimizer, build_scheduler
from .plots import plot_curves
from .precision import autocast, make_grad_scaler, resolve_amp
from .progress import Progress
from .rundir import RunDir
from .sampler import GlobalBatchSampler
from .schema import TrainConfig
from .seeding import capture_rng_state, restore_rng_state, seed_everything

Stopped = Literal["completed", "early_stop", "stop_after"]


class TrainingDiverged(UserError):
    """The training loss became NaN or infinite (usually: learning rate too high)."""


@dataclass
class TrainTask:
    """What a domain gives the engine.

    Attributes:
        model: the network, with float32 parameters (see :func:`precision.float32_forward` for SSM parts).
        train_data: map-style dataset (``len`` and ``[i]``); if it has ``set_epoch(epoch)``, the
            engine calls it before each epoch (also when resuming), like a DistributedSampler.
        loss: ``loss(model, batch) -> scalar tensor``, the mean over the batch. ``model`` may be
            wrapped in DistributedDataParallel: call it, do not reach into its attributes.
        val_data: optional map-style dataset for evaluation.
        evaluate: ``evaluate(model, batches) -> {metric: float}`` over an iterable of device batches,
            run under ``torch.no_grad()`` in eval mode; must contain ``train.monitor``. Default: the
            mean of ``loss`` over the batches, as ``{"loss": ...}``.
        collate: DataLoader ``collate_fn`` (default: torch's).
    """

    model: nn.Module
    train_data: Dataset[Any]
    loss: Callable[[nn.Module, Any], torch.Tensor]
    val_data: Dataset[Any] | None = None
    evaluate: Callable[[nn.Module, Iterable[Any]], Mapping[str, float]] | None = None
    collate: Callable[[list[Any]], Any] | None = None


@dataclass
class TrainResult:
    """Outcome of :func:`train` (``model`` is the unwrapped, trained module)."""

    step: int
    stopped: Stopped
    best: dict[str, Any] | None
    last_eval: dict[str, float] | None
    train_loss: float | None
    wall_s: float
    model: nn.Module
    run_dir: RunDir | None = None

    def describe(self) -> str:
        """One line for the user, e.g. ``completed at step 200; best loss 0.0123 at step 150; runs/toy/a``."""
        how = {"completed": "completed", "early_stop": "stopped early", "stop_after": "paused (resume to continue)"}
        parts = [f"{how[self.stopped]} at step {self.step}"]
        if self.best is not None:
            parts.append(f"best {self.best['metric']} {self.best['value']:.4g} at step {self.best['step']}")
        elif self.train_loss is not None:
            parts.append(f"train loss {self.train_loss:.4g}")
        if self.run_dir is not None:
            parts.append(str(self.run_dir.path))
        return "; ".join(parts)


@dataclass
class _Loop:
    """Loop position and bookkeeping; stored in the checkpoint as plain data."""

    step: int = 0
    epoch: int = 0
    batch: int = 0
    elapsed_s: float = 0.0
    best_value: float | None = None
    best_step: int | None = None
    best_metrics: dict[str, float] | None = None
    bad_evals: int = 0
    last_eval: dict[str, float] | None = None
    last_eval_step: int = -1
    train_loss: float | None = None


def move_to(batch: Any, device: torch.device) -> Any:
    """Tensors in a (nested) batch of tuples/lists/dicts moved to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: move_to(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to(v, device) for v in batch)
    return batch


def _set_deterministic(device: torch.device) -> None:
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False


class _Trainer:
    def __init__(
        self,
        task_factory: Callable[[], TrainTask],
        cfg: TrainConfig,
        run_dir: RunDir | None,
        config: Any,
        quiet: bool,
        stop_after: int,
    ) -> None:
        self.task_factory, self.cfg, self.run_dir = task_factory, cfg, run_dir
        self.config, self.quiet, self.stop_after = config, quiet, stop_after

    # ---------------------------------------------------------------- setup
    def _prepare_folder(self, env: DistEnv, resume: bool, overwrite: bool) -> None:
        rd = self.run_dir
        if rd is None:
            if resume:
                raise ValueError("train: resume=True needs a run_dir")
            return
        rd.check_start(resume=resume, overwrite=overwrite)
        barrier(env)  # every rank has checked before rank 0 changes anything
        if env.is_main:
            if overwrite:
                rd.clear()
            rd.create()
            if self.config is not None:
                save_config(self.config, rd.config)
        barrier(env)

    def _loaders(self, task: TrainTask, env: DistEnv) -> tuple[GlobalBatchSampler, DataLoader[Any], DataLoader[Any] | None]:
        cfg, n = self.cfg, len(task.train_data)
        if cfg.batch_size % env.world_size:
            raise UserError(
                f"train.batch_size={cfg.batch_size} must be divisible by the number of processes ({env.world_size})"
            )
        if cfg.batch_size > n:
            raise UserError(f"train.batch_size={cfg.batch_size} exceeds the training set size ({n})")
        sampler = GlobalBatchSampler(n, cfg.batch_size, seed=cfg.seed, rank=env.rank, world_size=env.world_size)
        common: dict[str, Any] = {"num_workers": cfg.num_workers, "pin_memory": env.device.type == "cuda"}
        if task.collate is not None:
            common["collate_fn"] = task.collate
        # A private generator: creating a loader iterator must not consume the global torch RNG,
        # or a resumed run (which creates one mid-epoch) would drift from an uninterrupted one.
        generator = torch.Generator().manual_seed(cfg.seed)
        train = DataLoader(task.train_data, batch_sampler=sampler, generator=generator, **common)
        val = None
        if task.val_data is not None:
            val = DataLoader(task.val_data, batch_size=cfg.eval_batch_size or cfg.batch_size, shuffle=False, **common)
        return sampler, train, val

    # ------------------------------------------------------------ evaluation
    def _evaluate(
        self, task: TrainTask, model: nn.Module, loader: DataLoader[Any], device: torch.device, amp: torch.dtype | None
    ) -> dict[str, float]:
        def batches() -> Iterator[Any]:
            for b in loader:
                yield move_to(b, device)

        model.eval()
        try:
            with torch.no_grad(), autocast(device, amp):
                if task.evaluate is not None:
                    raw = task.evaluate(model, batches())
                else:
                    losses = [float(task.loss(model, b)) for b in batches()]
                    raw = {"loss": sum(losses) / max(1, len(losses))}
        finally:
            model.train()
        metrics = {k: float(v) for k, v in raw.items()}
        if self.cfg.monitor not in metrics:
            raise UserError(f"train.monitor={self.cfg.monitor!r} is not an evaluation metric; available: {sorted(metrics)}")
        return metrics

    def _track(self, loop: _Loop, metrics: dict[str, float]) -> bool:
        """Update best/early-stop state; ``True`` when this evaluation is a new best."""
        cfg, value = self.cfg, metrics[self.cfg.monitor]
        if loop.best_value is None:
            better = math.isfinite(value)
        elif cfg.monitor_mode == "min":
            better = value < loop.best_value - cfg.min_delta
        else:
            better = value > loop.best_value + cfg.min_delta
        if better:
            loop.best_value, loop.best_step, loop.best_metrics, loop.bad_evals = value, loop.step, dict(metrics), 0
        else:
            loop.bad_evals += 1
        return better

    # ----------------------------------------------------------- checkpoints
    def _save(
        self,
        env: DistEnv,
        loop: _Loop,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        scaler: Any,
        window: tuple[float, int],
    ) -> None:
        # Per-rank state (RNG streams, the partial train-loss logging window), gathered to rank 0.
        # Collective: every rank takes part.
        ranks = gather_objects(env, {"rng": capture_rng_state(), "window": window})
        if env.is_main and self.run_dir is not None:
            save_checkpoint(
                {
                    "kind": "train",
                    "step": loop.step,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(),
                    "loop": asdict(loop),
                    "ranks": ranks,
                    "world_size": env.world_size,
                    "train_config": config_to_dict(self.cfg),
                    "config": None if self.config is None else config_to_dict(self.config),
                },
                self.run_dir.checkpoint,
            )

    def _save_best(self, env: DistEnv, loop: _Loop, model: nn.Module) -> None:
        if env.is_main and self.run_dir is not None:
            save_checkpoint(
                {
                    "kind": "best",
                    "step": loop.step,
                    "model": model.state_dict(),
                    "metrics": loop.best_metrics,
                    "monitor": self.cfg.monitor,
                    "config": None if self.config is None else config_to_dict(self.config),
                },
                self.run_dir.best,
            )

    def _finish_files(self, env: DistEnv, loop: _Loop, stopped: Stopped, amp: torch.dtype | None) -> None:
        rd = self.run_dir
        if not env.is_main or rd is None:
            return
        write_json(
            rd.summary,
            {
                "stopped": stopped,
                "step": loop.step,
                "steps": self.cfg.steps,
                "epoch": loop.epoch,
                "train_loss": loop.train_loss,
                "best": self._best(loop),
                "last_eval": loop.last_eval,
                "last_eval_step": loop.last_eval_step if loop.last_eval is not None else None,
                "world_size": env.world_size,
                "device": str(env.device),
                "precision": "float32" if amp is None else str(amp).replace("torch.", ""),
                "wall_s": round(loop.elapsed_s, 3),
            },
        )
        if rd.metrics.exists():
            plot_curves(read_metrics(rd.metrics), rd.figures)

    def _best(self, loop: _Loop) -> dict[str, Any] | None:
        if loop.best_value is None:
            return None
        return {
            "metric": self.cfg.monitor,
            "mode": self.cfg.monitor_mode,
            "value": loop.best_value,
            "step": loop.best_step,
            "metrics": loop.best_metrics,
        }

    # ------------------------------------------------------------------ loop
    def run(self, env: DistEnv, resume: bool, overwrite: bool) -> TrainResult:
        cfg, rd = self.cfg, self.run_dir
        self._prepare_folder(env, resume, overwrite)
        if cfg.deterministic:
            _set_deterministic(env.device)
        amp = resolve_amp(cfg.amp, env.device)

        seed_everything(cfg.seed)  # identical model initialisation on every rank and every run
        task = self.task_factory()
        model = task.model.to(env.device)
        sampler, train_loader, val_loader = self._loaders(task, env)
        optimizer = build_optimizer(model, cfg)
        scheduler = build_scheduler(optimizer, cfg)
        scaler = make_grad_scaler(env.device, amp)
        logger = MetricsLogger(rd.metrics if rd is not None and env.is_main else None)

        loop, window = _Loop(), (0.0, 0)
        if resume:
            assert rd is not None
            ckpt = load_checkpoint(rd.checkpoint, map_location="cpu")
            load_model_weights(model, ckpt["model"], source=rd.checkpoint)
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            scaler.load_state_dict(ckpt["scaler"])
            loop = _Loop(**ckpt["loop"])
            mine = ckpt["ranks"][env.rank % len(ckpt["ranks"])]
            restore_rng_state(mine["rng"])
            window = mine["window"]
            logger.truncate_after(loop.step)
        else:
            seed_everything(cfg.seed + 1 + env.rank)  # training-time randomness (dropout ...) per rank

        ddp: nn.Module = model
        if env.is_distributed:
            ddp = DistributedDataParallel(model, device_ids=[env.device.index] if env.device.type == "cuda" else None)

        progress = Progress(cfg.steps, initial=loop.step, enabled=env.is_main and not self.quiet)
        t_start, elapsed_before = time.perf_counter(), loop.elapsed_s
        running, count = torch.tensor(window[0], device=env.device), window[1]
        saved_at = loop.step if resume else -1
        stopped: Stopped = "completed"
        params = [p for p in model.parameters() if p.requires_grad]
        model.train()
        try:
            while loop.step < cfg.steps and stopped == "completed":
                sampler.set_position(loop.epoch, loop.batch)
                if hasattr(task.train_data, "set_epoch"):  # per-epoch randomness of the dataset (patches)
                    task.train_data.set_epoch(loop.epoch)
                for batch in train_loader:
                    batch = move_to(batch, env.device)
                    with autocast(env.device, amp):
                        loss = task.loss(ddp, batch)
                    if loss.dim() != 0:
                        raise ValueError(f"TrainTask.loss must return a scalar tensor, got shape {tuple(loss.shape)}")
                    optimizer.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                    if cfg.grad_clip > 0:
                        scaler.unscale_(optimizer)
                        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                    lr = optimizer.param_groups[0]["lr"]
                    scaler.step(optimizer)
                    scaler.update()
                    scheduler.step()
                    loop.step += 1
                    loop.batch += 1
                    loop.elapsed_s = elapsed_before + time.perf_counter() - t_start
                    running += loss.detach().float()
                    count += 1
                    progress.advance(loop.step)

                    if loop.step % cfg.log_every == 0 or loop.step == cfg.steps:
                        mean = float(mean_across(env, running / count))
                        if not math.isfinite(mean):
                            raise TrainingDiverged(
                                f"training diverged: loss is {mean} at step {loop.step} (try a lower train.lr)"
                            )
                        loop.train_loss = mean
                        elapsed = round(loop.elapsed_s, 3)
                        logger.log("train", loop.step, {"epoch": loop.epoch, "loss": mean, "lr": lr, "elapsed_s": elapsed})
                        progress.log({"loss": mean, "lr": lr})
                        running.zero_()
                        count = 0

                    if val_loader is not None and cfg.eval_every and loop.step % cfg.eval_every == 0:
                        stopped = self._eval_step(env, task, model, val_loader, amp, loop, logger, progress)

                    if cfg.checkpoint_every and loop.step % cfg.checkpoint_every == 0 and loop.step < cfg.steps:
                        self._save(env, loop, model, optimizer, scheduler, scaler, (float(running), count))
                        saved_at = loop.step
                    if stopped == "completed" and self.stop_after and loop.step >= self.stop_after and loop.step < cfg.steps:
                        stopped = "stop_after"
                    if stopped != "completed" or loop.step >= cfg.steps:
                        break
                else:
                    loop.epoch += 1
                    loop.batch = 0

            if stopped == "completed" and val_loader is not None and loop.last_eval_step != loop.step:
                self._eval_step(env, task, model, val_loader, amp, loop, logger, progress)
            if saved_at != loop.step:
                self._save(env, loop, model, optimizer, scheduler, scaler, (float(running), count))
            self._finish_files(env, loop, stopped, amp)
        finally:
            progress.close()
        barrier(env)
        return TrainResult(loop.step, stopped, self._best(loop), loop.last_eval, loop.train_loss, loop.elapsed_s, model, rd)

    def _eval_step(
        self,
        env: DistEnv,
        task: TrainTask,
        model: nn.Module,
        loader: DataLoader[Any],
        amp: torch.dtype | None,
        loop: _Loop,
        logger: MetricsLogger,
        progress: Progress,
    ) -> Stopped:
        # Every rank evaluates the whole validation set with identical weights, so every rank
        # reaches the same best/early-stop decision without communication.
        metrics = self._evaluate(task, model, loader, env.device, amp)
        loop.last_eval, loop.last_eval_step = metrics, loop.step
        logger.log("val", loop.step, metrics)
        progress.message(f"eval step {loop.step}: " + " ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
        if self._track(loop, metrics):
            self._save_best(env, loop, model)
        elif self.cfg.patience and loop.bad_evals >= self.cfg.patience:
            progress.message(f"early stop: no {self.cfg.monitor} improvement in {loop.bad_evals} evaluations")
            return "early_stop"
        return "completed"


def train(
    task_factory: Callable[[], TrainTask],
    cfg: TrainConfig,
    *,
    run_dir: RunDir | None = None,
    config: Any = None,
    resume: bool = False,
    overwrite: bool = False,
    stop_after: int = 0,
    quiet: bool = False,
) -> TrainResult:
    """Train the task built by ``task_factory`` (called after seeding) for ``cfg.steps`` steps.

    Runs in one process, or under ``torchrun --nproc_per_node=K`` with DistributedDataParallel
    (gloo on CPU, NCCL on GPU; ``cfg.batch_size`` is the global batch). Only rank 0 writes.

    Args:
        task_factory: builds the :class:`TrainTask`.
        cfg: engine settings.
        run_dir: run folder; ``None`` trains without writing anything.
        config: the domain's whole resolved config, written to ``config.yaml`` and into checkpoints.
        resume: continue from ``run_dir/checkpoint.pt`` (model, optimiser, scheduler, scaler, step,
            sampler position, RNG states); on CPU the result equals the uninterrupted run.
        overwrite: replace an existing run in ``run_dir``.
        stop_after: stop after this step as if interrupted (checkpoint written; ``resume`` continues);
            0 runs to ``cfg.steps``. The schedule always spans ``cfg.steps``.
        quiet: no progress output.

    Raises:
        UserError: run folder conflicts, batch size vs data or process count, unknown
            ``cfg.monitor``, AMP on CPU, or a diverged (non-finite) loss.
    """
    if isinstance(stop_after, bool) or not isinstance(stop_after, int) or stop_after < 0:
        raise ValueError(f"train: stop_after must be an int >= 0, got {stop_after!r}")
    env = init_distributed(cfg.device)
    try:
        return _Trainer(task_factory, cfg, run_dir, config, quiet, stop_after).run(env, resume, overwrite)
    finally:
        shutdown(env)
