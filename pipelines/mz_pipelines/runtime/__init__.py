"""The pipeline runtime shared by every domain (medseg, eeg, audio, tracking, motion, toy).

One job per module; only the torch-free ones are re-exported here, so importing the package (and
answering ``--help`` or a user error) does not load torch:

- ``errors``      :class:`UserError` and the exit-code convention (user mistakes: one line, code 2)
- ``config``      typed dataclass configs: defaults < YAML < ``--set`` overrides, strict keys
- ``schema``      the shared ``run`` and ``train`` config sections
- ``registry``    :class:`Domain` and its verbs; domain discovery for the ``mambazoo`` command
- ``rundir``      the run folder layout ``runs/<domain>/<name>/``
- ``files``       atomic writes
- ``engine``      the training loop (:func:`engine.train`, :class:`engine.TrainTask`)
- ``distributed`` torchrun / DistributedDataParallel setup (NCCL on GPU, gloo on CPU)
- ``sampler``     the resumable global-batch sampler
- ``checkpoint``  atomic save, ``weights_only`` load
- ``seeding``     seeds and RNG state capture
- ``precision``   AMP on CUDA, float32 islands for SSM code (:func:`precision.float32_forward`)
- ``optim``       AdamW parameter groups, warm-up + cosine schedules
- ``metrics``     ``metrics.jsonl``; ``plots``: PNG curves; ``progress``: tqdm bar with ETA
- ``bench``       the benchmark harness behind every ``bench`` verb

See :mod:`mz_pipelines.toy` for a complete, minimal domain built on it.
"""
from __future__ import annotations

from .config import config_from_dict, config_to_dict, dump_config, load_yaml, resolve_config, save_config
from .errors import UserError, require_dir, require_file, run_cli
from .registry import Domain, discover_domains, load_domain
from .rundir import RunDir, saved_config_base
from .schema import RunConfig, TrainConfig

__all__ = [
    "Domain",
    "RunConfig",
    "RunDir",
    "TrainConfig",
    "UserError",
    "config_from_dict",
    "config_to_dict",
    "discover_domains",
    "dump_config",
    "load_domain",
    "load_yaml",
    "require_dir",
    "require_file",
    "resolve_config",
    "run_cli",
    "save_config",
    "saved_config_base",
]
