"""The boundary between the orchestrator and whatever trains and predicts a fold.

The driver and the fold actor know a backend only through `FoldBackend`: they never import
Detectron2. Two optional methods, called on the driver when a backend has them:
``fetch_weights(train) -> Path | None`` (the initial weights as a local file, fetched once; the
driver stores them in the run dir for every fold) and ``describe(train, dataset) -> str`` (the
merged model config, part of the run's fingerprint and written to ``model_config.yaml``). The
product's backend is `kfold_ray.detectron2.Detectron2Backend`; test doubles live in tests/ only.

A backend's `run_fold` is a generator of `FoldEvent`s: `Progress` updates while it trains and
predicts, and prediction batches (Arrow record batches, see `kfold_ray._schema`) as held-out
images are predicted. The fold actor forwards them, unchanged, through a Ray streaming generator.

A fold trained by several workers (``FoldTask.workers`` > 1) runs the backend's `run_fold` in each
of them (`kfold_ray.run._workers`), with ``task.worker`` saying which one: the backend trains
data-parallel in the process group Ray Train set up, then predicts only its share of the held-out
images (`worker_share`); only worker 0 yields `DiscardParts`, and the others wait for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Protocol, Union, runtime_checkable

import numpy as np
import pyarrow as pa

from ._config import PredictConfig, TrainConfig
from .data._dataset import CocoDataset


@dataclass(frozen=True, kw_only=True)
class FoldTask:
    """One fold's work, as the driver hands it to a fold actor.

    Attributes:
        run_name: unique name of the run (Detectron2 dataset names are derived from it).
        fold: fold number.
        attempt: 0 for the first try; a retry resumes from the fold's checkpoint.
        train_indices: int64 image indices the fold trains on.
        predict_indices: int64 held-out image indices still to predict (those already persisted
            by an earlier attempt are left out).
        work_dir: the fold's folder in the run's storage (a URI or an absolute path every node
            reads): checkpoints and logs live there, so a retry on any node resumes.
        seed: training seed of this fold.
        holdout_indices: int64 every image the fold holds out (predict_indices is what is left).
        predicted_with: the model that made the fold's persisted parts ("" if none). A backend
            whose model is another one (it had to train again) predicts every held-out image
            and first yields `DiscardParts`, so one fold's predictions come from one model.
        num_cpus: CPUs reserved for each of the fold's processes (its data-loading workers).
        num_gpus: GPUs reserved for each of the fold's processes.
        workers: processes that train the fold (DDP); 1: the fold actor alone.
        workers_across_nodes: the workers may spread over nodes (else all on one node).
        worker: which of them this is (None: the fold actor alone).
        weights: initial weights the driver placed in the run's storage ("" = the config's own).
        keep_checkpoints: how many of the newest checkpoints are kept.
    """

    run_name: str
    fold: int
    attempt: int
    train_indices: np.ndarray
    predict_indices: np.ndarray
    work_dir: str
    seed: int
    train: TrainConfig = field(default_factory=TrainConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)
    checkpoint_period: int | None = None
    holdout_indices: np.ndarray | None = None
    predicted_with: str = ""
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    workers: int = 1
    workers_across_nodes: bool = False
    worker: "FoldWorker | None" = None
    weights: str = ""
    keep_checkpoints: int = 2


@dataclass(frozen=True)
class FoldWorker:
    """One of the processes that train a fold together (its place in the Ray Train group)."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node_rank: int


def worker_share(ordered: np.ndarray, worker: FoldWorker | None) -> np.ndarray:
    """The held-out images this worker predicts: every world_size-th of ``ordered`` from its rank
    (shares are disjoint and cover everything; strided so each gets the same mix of sizes)."""
    if worker is None:
        return ordered
    return ordered[worker.rank::worker.world_size]

@dataclass(frozen=True)
class Progress:
    """A fold's progress. ``stage`` is ``train`` (step = iteration) or ``predict`` (step = images)."""

    fold: int
    stage: str
    step: int
    total: int
    loss: float | None = None


@dataclass(frozen=True)
class DiscardParts:
    """The fold's persisted parts came from another model than the one now predicting: the
    driver deletes them; this attempt predicts every held-out image."""

    fold: int
    model: str


@dataclass(frozen=True)
class Trained:
    """A process finished training the fold: where, as which rank, and a digest of the weights
    it predicts with (the ranks of a data-parallel fold must agree)."""

    fold: int
    rank: int
    world_size: int
    node: str
    weights: str


FoldEvent = Union[Progress, DiscardParts, Trained, pa.RecordBatch]


@runtime_checkable
class FoldBackend(Protocol):
    """Trains one fold and predicts its held-out images."""

    def validate(self, train: TrainConfig, dataset: CocoDataset, *, workers: int = 1) -> None:
        """Check the training configuration in the driver, before any fold is started, for
        folds trained by ``workers`` processes each.

        Raises ConfigError naming what is wrong.
        """

    def run_fold(self, task: FoldTask, dataset: CocoDataset) -> Iterator[FoldEvent]:
        """Train on ``task.train_indices``, then predict ``task.predict_indices`` in batches.

        Every image of ``task.predict_indices`` must appear in exactly one yielded batch's image
        indices, with or without detections. Training must resume from the last checkpoint in
        ``task.work_dir`` when there is one. Errors that would happen again on a retry (an
        unreadable image: ImageReadError; bad weights or config: ConfigError) are not retried.
        """
