"""A fold's training: Detectron2's DefaultTrainer, seeded from the fold's seed, resumed from its
latest checkpoint, each new checkpoint mirrored to the run's storage, progress yielded between
steps; its log goes to the fold's log.txt."""

from __future__ import annotations

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
    (hooks cannot yield). Returns the trained model (unwrapped from DDP in a fold of several
    workers: each predicts with its own copy).
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
            if sync is not None:
                sync.push()  # a checkpoint written by this step goes to the run's storage
            if trainer.iter % report_every == 0 or trainer.iter == max_iter - 1:
                loss = trainer.storage.latest().get("total_loss", (None,))[0]
                yield Progress(fold, "train", trainer.iter + 1, max_iter, loss)
        trainer.iter = max_iter
        trainer.after_train()
    if sync is not None:
        sync.push()
    yield Progress(fold, "train", max_iter, max_iter, None)
    return getattr(trainer.model, "module", trainer.model)


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
