"""Run configuration: frozen, keyword-only dataclasses, checked when they are made.

    CVConfig
     +-- train: TrainConfig        what model to train (Detectron2 config + KEY VALUE overrides)
     +-- predict: PredictConfig    how held-out images are predicted
     +-- failure: FailureConfig    retries and checkpoints

The CLI's flags map one-to-one onto these fields. Detectron2 ``KEY VALUE`` overrides are passed
through untouched (the backend checks them before any fold starts).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from ._exceptions import ConfigError

DEFAULT_MODEL = "COCO-Detection/faster_rcnn_R_50_FPN_3x.yaml"
SPLITS = ("kfold", "group", "stratified")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def flat_overrides(overrides: Any) -> tuple[str, ...]:
    """Detectron2 overrides as the flat ``(KEY, VALUE, ...)`` tuple of strings: from a flat
    sequence (as given), or a mapping (its items in order, each value as ``str``). A string is
    refused (a sequence of characters to Python, never what was meant)."""
    if isinstance(overrides, (str, bytes)):
        text = overrides.decode(errors="replace") if isinstance(overrides, bytes) else overrides
        raise ConfigError(
            f"overrides must be a KEY VALUE sequence or a dict, not a string: {text!r}; "
            f"write {text.split()!r} or {{'SOLVER.MAX_ITER': 2000, ...}}")
    if isinstance(overrides, Mapping):
        return tuple(str(x) for item in overrides.items() for x in item)
    try:
        return tuple(str(x) for x in overrides)
    except TypeError:
        raise ConfigError(f"overrides must be a KEY VALUE sequence or a dict, got "
                          f"{type(overrides).__name__}") from None


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """The model each fold trains.

    Attributes:
        model: a Detectron2 model-zoo config name (``COCO-Detection/faster_rcnn_R_50_FPN_3x.yaml``),
            a path to a Detectron2 YAML config, or a kfold-ray preset (``tiny``: a small from-scratch
            Faster R-CNN R18-FPN for CPU tests and the built-in example).
        overrides: Detectron2 ``KEY VALUE`` pairs, flat (``("SOLVER.MAX_ITER", "500")``), or a
            dict (``{"SOLVER.MAX_ITER": 500}``), kept as the flat tuple of strings either way (so
            a run dir made with either resumes with the other). A bare string is refused.
        amp: mixed precision training on GPU (ignored on CPU).
    """

    model: str = DEFAULT_MODEL
    overrides: tuple[str, ...] = ()
    amp: bool = True

    def __post_init__(self) -> None:
        _require(isinstance(self.model, str) and bool(self.model),
                 f"model must be a model-zoo name, a YAML path or a preset, got {self.model!r}")
        object.__setattr__(self, "overrides", flat_overrides(self.overrides))
        _require(len(self.overrides) % 2 == 0,
                 f"overrides must be KEY VALUE pairs; got an odd number of items: {list(self.overrides)}")


@dataclass(frozen=True, kw_only=True)
class PredictConfig:
    """Held-out inference.

    Attributes:
        batch_size: images per model call (and per streamed prediction batch).
        score_threshold: detections below this score are dropped. Keep it low: cleanlab wants
            the low-confidence boxes too.
        amp: fp16 autocast on GPU (ignored on CPU).
    """

    batch_size: int = 8
    score_threshold: float = 0.05
    amp: bool = True

    def __post_init__(self) -> None:
        _require(isinstance(self.batch_size, int) and self.batch_size >= 1,
                 f"batch_size must be an integer >= 1, got {self.batch_size!r}")
        _require(isinstance(self.score_threshold, (int, float)) and 0.0 <= self.score_threshold < 1.0,
                 f"score_threshold must be in [0, 1), got {self.score_threshold!r}")


@dataclass(frozen=True, kw_only=True)
class FailureConfig:
    """What happens when a fold's process dies.

    Attributes:
        max_retries: how many times a failed fold is restarted (resuming from its last
            checkpoint and its persisted predictions) before the run fails.
        checkpoint_period: training iterations between checkpoints in the run's storage;
            None (default): the model config's ``SOLVER.CHECKPOINT_PERIOD``.
        keep_checkpoints: how many of a fold's newest checkpoints are kept (~330 MB each for
            R50-FPN); older ones are deleted as new ones land.
    """

    max_retries: int = 2
    checkpoint_period: int | None = None
    keep_checkpoints: int = 2

    def __post_init__(self) -> None:
        _require(isinstance(self.max_retries, int) and self.max_retries >= 0,
                 f"max_retries must be an integer >= 0, got {self.max_retries!r}")
        _require(self.checkpoint_period is None
                 or (isinstance(self.checkpoint_period, int) and self.checkpoint_period >= 1),
                 f"checkpoint_period must be an integer >= 1 (or None), got {self.checkpoint_period!r}")
        _require(isinstance(self.keep_checkpoints, int) and self.keep_checkpoints >= 1,
                 f"keep_checkpoints must be an integer >= 1, got {self.keep_checkpoints!r}")


@dataclass(frozen=True, kw_only=True)
class CVConfig:
    """Everything that decides a run's result (recorded in ``config.json`` of the run dir).

    Attributes:
        k: number of folds, 2..number of images.
        split: ``kfold`` (shuffled), ``group`` or ``stratified`` (multi-label, by classes present).
        seed: seeds the fold plan and each fold's training (fold f uses seed + f).
        gpus_per_fold: GPUs reserved by each fold actor; fractions pack folds onto one GPU.
            On a cluster without GPUs, folds train on CPU.
        cpus_per_fold: CPUs reserved by each fold actor; Detectron2's training loader uses them
            (``DATALOADER.NUM_WORKERS`` = CPUs - 1 unless the user set it). None (default): the
            fold's share of its node's CPUs per GPU (48 CPUs / 4 GPUs -> 12 for one GPU), 1
            without GPUs.
        workers_per_fold: processes that train one fold data-parallel (DDP through Ray Train:
            NCCL on GPUs, gloo on CPUs); each gets an equal share of the fold's GPUs and CPUs and
            of ``SOLVER.IMS_PER_BATCH`` (the total batch, as in Detectron2's own multi-GPU
            training), and afterwards predicts a share of the held-out images. None (default):
            the whole number of GPUs per fold, else 1. With GPUs, one GPU per worker.
        workers_across_nodes: a multi-GPU fold's workers may be spread over several nodes
            (Ray Train's PACK); default False: they stay on one node (STRICT_PACK), where NCCL
            is fastest, so only nodes with that many GPUs host the fold.
    """

    k: int = 5
    split: str = "kfold"
    seed: int = 0
    gpus_per_fold: float = 1.0
    cpus_per_fold: float | None = None
    workers_per_fold: int | None = None
    workers_across_nodes: bool = False
    train: TrainConfig = field(default_factory=TrainConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)
    failure: FailureConfig = field(default_factory=FailureConfig)

    def __post_init__(self) -> None:
        _require(isinstance(self.k, int) and not isinstance(self.k, bool) and self.k >= 2,
                 f"k must be an integer >= 2, got {self.k!r}")
        _require(isinstance(self.seed, int), f"seed must be an integer, got {self.seed!r}")
        _require(isinstance(self.gpus_per_fold, (int, float)) and math.isfinite(self.gpus_per_fold)
                 and 0 <= self.gpus_per_fold and (self.gpus_per_fold <= 1 or self.gpus_per_fold == int(self.gpus_per_fold)),
                 f"gpus_per_fold must be a fraction in [0, 1] or a whole number, got {self.gpus_per_fold!r}")
        _require(self.cpus_per_fold is None
                 or (isinstance(self.cpus_per_fold, (int, float)) and self.cpus_per_fold > 0),
                 f"cpus_per_fold must be > 0 (or None: automatic), got {self.cpus_per_fold!r}")
        _require(self.workers_per_fold is None
                 or (isinstance(self.workers_per_fold, int) and not isinstance(self.workers_per_fold, bool)
                     and self.workers_per_fold >= 1),
                 f"workers_per_fold must be an integer >= 1 (or None: automatic), got {self.workers_per_fold!r}")
        # DDP runs one process per device: a worker with two GPUs would use one of them, and two
        # workers on one GPU cannot form an NCCL group.
        _require(self.workers == 1 or not self.gpus_per_fold or self.gpus_per_fold == self.workers,
                 f"workers_per_fold {self.workers} with gpus_per_fold {self.gpus_per_fold:g}: a fold "
                 "trained by several workers takes one whole GPU per worker (set them equal, or "
                 "workers_per_fold 1 to pack fractional GPUs)")

    @property
    def workers(self) -> int:
        """Processes that train each fold (``workers_per_fold`` resolved)."""
        if self.workers_per_fold is not None:
            return self.workers_per_fold
        return int(self.gpus_per_fold) if self.gpus_per_fold >= 1 else 1

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "CVConfig":
        d = dict(d)
        train = dict(d.pop("train", {}))
        train["overrides"] = tuple(train.get("overrides", ()))
        return cls(
            train=TrainConfig(**train),
            predict=PredictConfig(**d.pop("predict", {})),
            failure=FailureConfig(**d.pop("failure", {})),
            **d,
        )
