"""`Detectron2Backend`: the product's fold backend (kfold_ray._backend.FoldBackend).

On the driver it checks the config, dumps it for the run's fingerprint and fetches the initial
weights; in a fold actor it trains in node-local scratch (checkpoints mirrored to the run's
storage) and streams its held-out predictions.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import warnings
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np

from .. import _node
from .._backend import DiscardParts, FoldEvent, FoldTask, Trained, worker_share
from .._config import TrainConfig
from .._exceptions import ConfigError, FoldOutOfMemoryError, one_line
from .._node import node_name
from ..data._dataset import CocoDataset
from ..storage import _rundir
from ..storage._checkpoints import CheckpointSync
from ..storage._storage import Storage
from ._config import build_cfg, import_detectron2
from ._data import check_images_readable, image_error, register_split
from ._distributed import (
    buffers_from_rank0,
    from_rank0,
    join_local_group,
    synchronize,
    weights_digest,
)
from ._predict import by_size, predict_halving_on_oom
from ._train import fold_log, log_to_file, model_id, train
from ._weights import fetch_weights_file, local_weights


class Detectron2Backend:
    """Detectron2 fold backend. Stateless: safe to pickle into every fold actor."""

    # ---- configuration ----------------------------------------------------------------------
    def validate(self, train: TrainConfig, dataset: CocoDataset, *, workers: int = 1) -> None:
        cfg = self.build_cfg(train, num_classes=dataset.num_classes, device="cpu")
        if cfg.SOLVER.IMS_PER_BATCH % workers:
            # Detectron2's loader splits the total batch evenly over the processes, or refuses.
            raise ConfigError(
                f"SOLVER.IMS_PER_BATCH {cfg.SOLVER.IMS_PER_BATCH} is the total batch of a fold's "
                f"{workers} workers and must divide evenly among them: set it to a multiple of "
                f"{workers} (--opts SOLVER.IMS_PER_BATCH {workers * max(1, cfg.SOLVER.IMS_PER_BATCH // workers)})")
        # Segmentations are checked when the dataset loads, but only a model that trains masks
        # reads them: for a box detector a sloppy mask is a warning, not a reason to stop.
        from ._losses import no_signals_warning

        if (warning := no_signals_warning(cfg)) is not None:  # said once, before Ray starts
            logging.getLogger("kfold_ray").warning(warning)
        if cfg.MODEL.MASK_ON:
            error = dataset.mask_error()
            if error is not None:
                raise error
        elif (warning := dataset.mask_warning()) is not None:
            warnings.warn(warning, UserWarning, stacklevel=2)

    def describe(self, train: TrainConfig, dataset: CocoDataset) -> str:
        """The merged config every fold trains with, as YAML (Detectron2's ``cfg.dump()``).

        Part of the run's fingerprint (a resume never mixes two models) and of the run dir.
        Fold-specific keys (dataset name, output dir, seed, device) are left at neutral values.
        """
        return self.build_cfg(train, num_classes=dataset.num_classes, device="cpu").dump()

    def fetch_weights(self, train: TrainConfig) -> Path | None:
        """The config's ``MODEL.WEIGHTS`` as a local file on the driver (None: from scratch).

        Fetched once here, then placed in the run's storage by the driver, so that folds never
        reach for a URL. ConfigError naming MODEL.WEIGHTS, within seconds, when it cannot be had.
        """
        cfg = self.build_cfg(train, num_classes=1, device="cpu")
        spec = str(cfg.MODEL.WEIGHTS or "").strip()
        if not spec:
            return None
        try:
            return fetch_weights_file(spec)
        except Exception as e:  # noqa: BLE001 - any failure to fetch is the same advice
            raise ConfigError(
                f"MODEL.WEIGHTS {spec!r} cannot be fetched ({type(e).__name__}: {one_line(e)[:200]}): "
                "pass a local file or a URI every node can read (--opts MODEL.WEIGHTS /path/model.pkl), "
                "or train from scratch with --opts MODEL.WEIGHTS \"\""
            ) from None

    def build_cfg(self, train: TrainConfig, **kwargs):
        """Detectron2 ``CfgNode`` for ``train`` (see `kfold_ray.detectron2._config.build_cfg`)."""
        return build_cfg(train, **kwargs)

    # ---- one fold ---------------------------------------------------------------------------
    def run_fold(self, task: FoldTask, dataset: CocoDataset) -> Iterator[FoldEvent]:
        """Train in node-local scratch, checkpoints mirrored to the run's storage; then predict.

        In a fold of several workers every rank pulls the latest checkpoint and trains (DDP),
        rank 0 alone writes checkpoints and the log to storage, and each rank predicts its share.
        """
        import_detectron2()
        rank = task.worker.rank if task.worker else 0
        scratch = Path(tempfile.mkdtemp(prefix=f"kfold-ray-{task.run_name}-fold{task.fold}-r{rank}-"))
        sync = CheckpointSync(Storage(task.work_dir), scratch, keep=task.keep_checkpoints,
                              writer=rank == 0)
        try:
            if task.worker is not None:
                join_local_group(task.worker)
            yield from self._run_fold(task, dataset, scratch, sync)
        finally:
            sync.wait(raise_error=False)  # a checkpoint still uploading lands before we go
            sync.push_log()
            shutil.rmtree(scratch, ignore_errors=True)

    def _run_fold(self, task: FoldTask, dataset: CocoDataset, scratch: Path,
                  sync: CheckpointSync) -> Iterator[FoldEvent]:
        # First of all: a fold that reserved GPUs it cannot use stops here, on one line (never
        # a CPU fallback that trains for days). Looked up on the module: tests' fake-GPU permit
        # (tests/permit/) wraps it.
        device = _node.fold_device(task.num_gpus)
        check_images_readable(dataset, task)
        resumed = sync.pull()
        log_to_file(scratch / "log.txt")
        weights = local_weights(task.weights, scratch)
        train_name = f"{task.run_name}_fold{task.fold}_a{task.attempt}train"
        cfg = self.build_cfg(
            task.train, num_classes=dataset.num_classes, device=device, output_dir=str(scratch),
            dataset_name=train_name, seed=task.seed, checkpoint_period=task.checkpoint_period,
            score_threshold=task.predict.score_threshold,
            num_workers=max(0, int(task.num_cpus) - 1), weights=weights,
            mask_format=dataset.mask_format,
        )
        register_split(train_name, dataset, task.train_indices, masks=bool(cfg.MODEL.MASK_ON))
        fold_log(task, resumed, sync)
        if rank_zero(task):
            record_ran_with(task, cfg)
        model = yield from _train(cfg, task, sync)
        made_by = yield from _one_model(model, task, scratch, sync)
        task = yield from _what_to_predict(task, dataset, made_by)
        try:
            yield from predict_halving_on_oom(model, cfg, task, dataset, device, model_id=made_by)
        except FileNotFoundError as e:
            raise image_error(e) from None


def rank_zero(task: FoldTask) -> bool:
    return task.worker is None or task.worker.rank == 0


def record_ran_with(task: FoldTask, cfg) -> None:
    """What the fold really trains with, beside its checkpoints (not in the run's fingerprint):
    a resume that would move the checkpoint between CPU and GPU is refused up front
    (`kfold_ray.run._state.check_devices`), since Detectron2's AMPTrainer cannot load a CPU
    checkpoint's state, nor the plain trainer an AMP one's."""
    Storage(task.work_dir).write_json(_rundir.RAN_WITH, {
        "device": cfg.MODEL.DEVICE, "amp": bool(cfg.SOLVER.AMP.ENABLED), "gpus": task.num_gpus,
        "workers": task.workers, "attempt": task.attempt, "node": node_name()})


def _train(cfg, task: FoldTask, sync: CheckpointSync):
    """The fold's training, its errors turned into what the driver knows not to retry."""
    import torch

    try:
        return (yield from train(cfg, task.fold, sync))
    except torch.cuda.OutOfMemoryError:
        raise FoldOutOfMemoryError(
            task.fold, "training", cfg.SOLVER.IMS_PER_BATCH,
            "lower SOLVER.IMS_PER_BATCH (--opts) or the input size (INPUT.MAX_SIZE_TRAIN), or "
            "raise --gpus-per-fold so fewer folds share a GPU (fractional GPUs share memory)",
        ) from None
    except FileNotFoundError as e:
        raise image_error(e) from None


def _one_model(model, task: FoldTask, scratch: Path, sync: CheckpointSync):
    """Every rank holds the model of the fold's final checkpoint; yield `Trained`, return its id."""
    worker = task.worker
    if worker is not None:
        buffers_from_rank0(model)
    yield Trained(task.fold, worker.rank if worker else 0, worker.world_size if worker else 1,
                  node_name(), weights_digest(model))
    made_by = model_id(scratch, sync)
    return from_rank0(made_by) if worker is not None else made_by  # rank 0 wrote the checkpoint


def _what_to_predict(task: FoldTask, dataset: CocoDataset, made_by: str):
    """The task with the held-out images this process predicts: all of them again after
    `DiscardParts` (the fold was trained again: one fold, one model), this worker's share."""
    worker = task.worker
    if task.predicted_with and task.predicted_with != made_by:
        if worker is None or worker.rank == 0:
            yield DiscardParts(task.fold, made_by)
        task = dataclasses.replace(task, predict_indices=np.asarray(task.holdout_indices))
    if worker is not None:
        synchronize()  # no rank streams a prediction before the driver has the DiscardParts
        ordered = by_size(dataset, np.asarray(task.predict_indices, dtype=np.int64))
        task = dataclasses.replace(task, predict_indices=worker_share(ordered, worker))
    return task
