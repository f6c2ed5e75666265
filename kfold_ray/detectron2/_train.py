"""A fold's training: Detectron2's DefaultTrainer, seeded from the fold's seed, resumed from its
latest checkpoint, each new checkpoint mirrored to the run's storage in the background (the
final one before training returns), progress yielded between steps; its log goes to the fold's
log.txt. When training ends, everything of the trainer but the model is released before the
fold predicts (optimizer state, data loader and its worker processes, hooks)."""

from __future__ import annotations

import gc
import logging
from pathlib import Path

from .._backend import FoldTask, Progress
from .._node import node_name
from ..storage._checkpoints import CheckpointSync
from ..storage._storage import file_sha256
from ._distributed import ddp_on_the_model_device


def train(cfg, fold: int, sync: CheckpointSync | None = None):
    """Train with Detectron2's DefaultTrainer, resuming from the fold's last checkpoint.

    The loop is TrainerBase.train written out, so that progress can be yielded between steps
    (hooks cannot yield). Each checkpoint is uploaded while the next steps run; the final one is
    in storage when this returns. Returns the trained model (unwrapped from DDP in a fold of
    several workers: each predicts with its own copy), the rest of the trainer released.
    """
    from detectron2.engine import DefaultTrainer
    from detectron2.utils.env import seed_all_rng
    from detectron2.utils.events import EventStorage

    # Python, numpy and torch from the fold's seed: the model's initial weights, the training
    # sampler's order (it draws its seed from numpy) and the loader workers' augmentation.
    seed_all_rng(cfg.SEED)
    with ddp_on_the_model_device():  # a fold of several workers: DDP on CPU or this worker's GPU
        trainer = DefaultTrainer(cfg)
    trainer.resume_or_load(resume=True)  # last_checkpoint in OUTPUT_DIR, else MODEL.WEIGHTS
    start, max_iter = trainer.start_iter, trainer.max_iter
    if start:
        logging.getLogger("detectron2.kfold_ray").info(
            "kfold-ray fold %d resumes training at iteration %d of %d", fold, start, max_iter)
    report_every = max(1, min(20, max_iter // 50 or 1))
    with EventStorage(start) as trainer.storage:
        trainer.iter = start
        trainer.before_train()
        for trainer.iter in range(start, max_iter):
            trainer.before_step()
            trainer.run_step()
            trainer.after_step()
            if sync is not None:  # a checkpoint written by this step goes to the run's storage
                sync.push_in_background()
            if trainer.iter % report_every == 0 or trainer.iter == max_iter - 1:
                loss = trainer.storage.latest().get("total_loss", (None,))[0]
                yield Progress(fold, "train", trainer.iter + 1, max_iter, loss)
        trainer.iter = max_iter
        trainer.after_train()
    model = getattr(trainer.model, "module", trainer.model)
    release_trainer(trainer)
    del trainer
    if sync is not None:
        sync.push()  # after the upload in flight: the final checkpoint, before any prediction
    free_memory()
    yield Progress(fold, "train", max_iter, max_iter, None)
    return model


def release_trainer(trainer) -> None:
    """Drop what a finished DefaultTrainer holds besides the model: its data loader (its worker
    processes stop now), optimizer state, scheduler, checkpointer and hooks.

    Detectron2 0.6's own hooks drop their references to the trainer in after_train, so today the
    trainer goes by reference counting when training returns (measured: benchmarks/README.md);
    a hook that keeps its trainer (a user's) would leave it to the cycle collector, whenever that
    runs, and a neighbour fold on the same GPU (``--gpus-per-fold 0.5``) could then run out of
    memory while training, which is never retried. Dropping the parts here depends on neither.
    """
    inner = getattr(trainer, "_trainer", None)
    loader_iter = getattr(inner, "_data_loader_iter", None)
    if hasattr(loader_iter, "close"):  # Detectron2's grouped loader: a generator over torch's
        loader_iter.close()
    shutdown = getattr(loader_iter, "_shutdown_workers", None)  # torch's iterator itself
    if callable(shutdown):
        shutdown()
    for owner, names in ((inner, ("_data_loader_iter", "data_loader", "optimizer", "grad_scaler")),
                         (trainer, ("scheduler", "checkpointer", "_hooks", "storage"))):
        for name in names:
            if owner is not None and hasattr(owner, name):
                setattr(owner, name, [] if name == "_hooks" else None)


def free_memory() -> None:
    """Collect what training left in reference cycles; give cached GPU memory back to the driver
    (others on the same GPU can use it)."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def log_to_file(path: Path) -> None:
    """Send Detectron2's (and fvcore's) training log to the fold's log.txt, not to the console:
    the driver shows progress; with K folds side by side their console logs would interleave."""
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("[%(asctime)s %(name)s] %(message)s", "%m/%d %H:%M:%S"))
    for name in ("detectron2", "fvcore", "d2"):
        logger = logging.getLogger(name)
        logger.setLevel(logging.INFO)  # also keeps DefaultTrainer from adding a console logger
        logger.propagate = False
        for old in [h for h in logger.handlers if isinstance(h, logging.FileHandler)]:
            logger.removeHandler(old)
        logger.addHandler(handler)


def fold_log(task: FoldTask, resumed: str | None, sync: CheckpointSync) -> None:
    """One line in the fold's log saying where this attempt runs and what it resumes from."""
    where = sync.storage.uri_of(resumed) if resumed else "nothing (training from the start)"
    who = f" (worker {task.worker.rank} of {task.worker.world_size})" if task.worker else ""
    logging.getLogger("detectron2.kfold_ray").info(
        "kfold-ray fold %d attempt %d on node %s%s: resuming from %s",
        task.fold, task.attempt, node_name(), who, where,
    )


def model_id(scratch: Path, sync: CheckpointSync) -> str:
    """``<checkpoint name>:<sha256 prefix>`` of the trained model (what its predictions record)."""
    name = sync.latest_local()
    if not name or not (scratch / name).is_file():
        return ""
    return f"{name}:{file_sha256(scratch / name)[:16]}"
