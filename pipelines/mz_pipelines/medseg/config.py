"""Config of the medseg domain: ``data``, ``model``, ``infer``, ``train`` (engine) and ``run`` sections.

Defaults are the CPU recipe the evidence tests use: the tiny SegMamba-style model on 32^3 patches
of the synthetic task (``mambazoo medseg synth``); a real task changes ``data.path``, ``data.roi``,
``data.spacing``, ``data.intensity`` and ``model.preset``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from mz_pipelines.runtime.schema import RunConfig, TrainConfig

#: patch size per task dimensionality when ``data.roi`` is empty
DEFAULT_ROI = {2: [64, 64], 3: [32, 32, 32]}
#: network per task dimensionality when ``model.name`` is ``"auto"``
DEFAULT_MODEL = {2: "vmunet", 3: "segmamba"}

INTENSITY_HELP = "'zscore' (per volume, foreground voxels), 'ct:A,B' (clip HU to [A, B] and scale to [0, 1]) or 'none'"


def check_intensity(value: str) -> str:
    """Validate an intensity spec (see :data:`INTENSITY_HELP`); returns it unchanged."""
    if value in ("zscore", "none"):
        return value
    if value.startswith("ct:"):
        try:
            low, high = (float(v) for v in value[3:].split(","))
        except ValueError:
            raise ValueError(f"data.intensity 'ct:A,B' needs two numbers, got {value!r}") from None
        if not low < high:
            raise ValueError(f"data.intensity 'ct:A,B' needs A < B, got {value!r}")
        return value
    raise ValueError(f"data.intensity must be {INTENSITY_HELP}, got {value!r}")


@dataclass
class MedsegDataConfig:
    """The task folder (``dataset.json``) and how volumes become training patches.

    ``spacing`` empty keeps each volume's own voxel size (else resample to it, in mm, one value per
    axis); ``roi`` is the patch size, one value per spatial axis (empty: :data:`DEFAULT_ROI` for the
    task's dimensionality, filled in when training starts); ``pos``/``neg`` weight foreground-centred
    vs random (possibly empty) patches.
    """

    path: str = "data/medseg"
    roi: list[int] = field(default_factory=list)
    spacing: list[float] = field(default_factory=list)
    intensity: str = "zscore"
    pos: float = 1.0
    neg: float = 1.0
    patches_per_case: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        if self.roi and (len(self.roi) not in (2, 3) or min(self.roi) < 1):
            raise ValueError(f"data.roi must be empty (auto) or 2 or 3 positive ints (one per spatial axis), got {self.roi}")
        if self.spacing and (len(self.spacing) not in (2, 3) or min(self.spacing) <= 0):
            raise ValueError(f"data.spacing must be empty or one positive number (mm) per spatial axis, got {self.spacing}")
        if self.spacing and self.roi and len(self.spacing) != len(self.roi):
            raise ValueError(f"data.spacing {self.spacing} and data.roi {self.roi} must have one value per spatial axis each")
        check_intensity(self.intensity)
        if self.pos < 0 or self.neg < 0 or self.pos + self.neg == 0:
            raise ValueError(f"data.pos and data.neg must be >= 0 and not both 0, got {self.pos}, {self.neg}")
        if self.patches_per_case < 1:
            raise ValueError(f"data.patches_per_case must be >= 1, got {self.patches_per_case}")

    @property
    def spatial_dims(self) -> int:
        """2 or 3 (from ``roi``, else ``spacing``); 0 while both are empty (before the task is read)."""
        return len(self.roi or self.spacing)


@dataclass
class MedsegModelConfig:
    """Network by registry name (see ``mz_pipelines.medseg.models``; ``"auto"``: :data:`DEFAULT_MODEL`
    for the task's dimensionality) and size preset.

    ``in_channels``/``out_channels`` 0 take them from ``dataset.json`` (channels; labels incl. background);
    ``labels`` (label value -> name) is filled from ``dataset.json`` when training starts, so a trained
    run carries its label names into ``predict`` and the app. ``use_checkpoint`` turns on activation
    checkpointing in training (``segmamba`` and ``swinunetr``): about half the memory, 10-20% more step time.
    ``block_impl`` (``segmamba`` and ``swinunetr``): ``"lean"`` or ``"monai"`` UNETR residual blocks (same
    weights and maths; lean keeps fewer maps for backward); empty keeps the model's default.
    """

    name: str = "auto"
    preset: str = "tiny"
    in_channels: int = 0
    out_channels: int = 0
    labels: dict[str, str] = field(default_factory=dict)
    use_checkpoint: bool = False
    block_impl: str = ""

    def __post_init__(self) -> None:
        if self.in_channels < 0 or self.out_channels < 0:
            raise ValueError(f"model.in_channels/out_channels must be >= 0, got {self.in_channels}, {self.out_channels}")
        if self.block_impl not in ("", "lean", "monai"):
            raise ValueError(f"model.block_impl must be '', 'lean' or 'monai', got {self.block_impl!r}")


@dataclass
class MedsegInferConfig:
    """Sliding-window inference (evaluation, prediction, app)."""

    overlap: float = 0.5
    mode: str = "gaussian"
    tta: str = "none"
    sw_batch_size: int = 2

    def __post_init__(self) -> None:
        if not 0.0 <= self.overlap < 1.0:
            raise ValueError(f"infer.overlap must be in [0, 1), got {self.overlap}")
        if self.mode not in ("gaussian", "constant"):
            raise ValueError(f"infer.mode must be 'gaussian' or 'constant', got {self.mode!r}")
        if self.tta not in ("none", "flip"):
            raise ValueError(f"infer.tta must be 'none' or 'flip', got {self.tta!r}")
        if self.sw_batch_size < 1:
            raise ValueError(f"infer.sw_batch_size must be >= 1, got {self.sw_batch_size}")


def _medseg_train() -> TrainConfig:
    return TrainConfig(
        steps=300,
        batch_size=4,
        eval_batch_size=1,
        lr=3e-3,
        warmup_steps=20,
        weight_decay=1e-4,
        eval_every=100,
        log_every=10,
        checkpoint_every=100,
        monitor="dice",
        monitor_mode="max",
    )


@dataclass
class MedsegConfig:
    data: MedsegDataConfig = field(default_factory=MedsegDataConfig)
    model: MedsegModelConfig = field(default_factory=MedsegModelConfig)
    infer: MedsegInferConfig = field(default_factory=MedsegInferConfig)
    train: TrainConfig = field(default_factory=_medseg_train)
    run: RunConfig = field(default_factory=RunConfig)
