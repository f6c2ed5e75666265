"""A fold trained by several processes: Ray Train workers, their events merged into one stream.

With ``workers_per_fold`` > 1 the fold actor does not train; it runs a
``ray.train.torch.TorchTrainer`` (DDP: NCCL on GPUs, gloo on CPUs) whose workers each run the
backend's `run_fold` with their place in the group (`FoldWorker`). Every event a worker yields
goes through a bounded `ray.util.queue.Queue` to the fold actor, which forwards it in its own
stream, so the driver sees a multi-worker fold exactly like a one-process fold:

- training progress from rank 0 only (all ranks run the same iterations);
- prediction batches from every rank (each predicts a disjoint share of the held-out images),
  with the fold's prediction progress counted here from the batches;
- `DiscardParts` from rank 0 (the backend makes the other ranks wait for it), `Trained` from all.

Failures are left to the driver, not to Ray Train: ``max_failures=0`` and no preemption retries,
so a dead or failed worker fails the fold actor, and the driver's retry resumes the fold from its
checkpoint in the run's storage with only its not-yet-persisted images to predict (a restart
inside Ray Train would predict again what this attempt already streamed). The error a worker
raised is re-raised as is (an out-of-memory or an unreadable image is still not retried).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from typing import Any, Iterator

import numpy as np
import pyarrow as pa

from .._backend import (
    DiscardParts,
    FoldBackend,
    FoldEvent,
    FoldTask,
    FoldWorker,
    Progress,
)
from .._exceptions import KfoldRayError
from .._schema import batch_image_indices
from ..data._dataset import CocoDataset
from ._fold_metrics import GpuUtilization

# Events a fold's workers may have queued before they wait for the fold actor to take them.
QUEUE_EVENTS = 32
_END = "kfold-ray:end-of-training"


def run_on_workers(backend: FoldBackend, task: FoldTask, dataset: CocoDataset) -> Iterator[FoldEvent]:
    """Run ``task`` on ``task.workers`` Ray Train workers; yield their events as one fold's."""
    import ray
    from ray.util.queue import Queue
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    # The queue reserves no CPU (a full cluster must not keep it from starting) and lives on the
    # fold actor's node, which owns it.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    events = Queue(maxsize=QUEUE_EVENTS,
                   actor_options={"num_cpus": 0, "scheduling_strategy": here})
    scratch = tempfile.mkdtemp(prefix="kfold-ray-train-")
    trainer = _trainer(backend, task, ray.put(dataset), events, scratch)
    failure: list[BaseException] = []

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as e:  # re-raised in the fold actor's thread below
            failure.append(e)
        finally:
            events.put(_END)

    thread = threading.Thread(target=fit, name=f"kfold-ray-fold{task.fold}-train", daemon=True)
    thread.start()
    total, done = len(task.predict_indices), 0
    while (item := events.get()) != _END:
        rank, event = item
        if isinstance(event, Progress):
            if event.stage == "train" and rank == 0:
                yield event
        elif isinstance(event, pa.RecordBatch):
            yield event
            done += len(batch_image_indices(event))
            yield Progress(task.fold, "predict", done, total)
        else:
            if isinstance(event, DiscardParts):  # every held-out image is predicted again
                total = len(np.asarray(task.holdout_indices))
            yield event
    thread.join()
    shutil.rmtree(scratch, ignore_errors=True)
    if failure:
        raise worker_error(failure[0])


def _trainer(backend: FoldBackend, task: FoldTask, dataset_ref: Any, events: Any, scratch: str):
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    use_gpu = task.num_gpus > 0
    resources = {"CPU": task.num_cpus, **({"GPU": task.num_gpus} if use_gpu else {})}
    # Ray Train records its runs (each fold's, with its workers) for the dashboard's Train API
    # (/api/train/v2/runs/v1) only when asked to, read here when the trainer is made; a user's
    # RAY_TRAIN_ENABLE_STATE_TRACKING=0 keeps it off.
    os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_TRACKING", "1")
    return TorchTrainer(
        _worker_loop,
        train_loop_config={"backend": backend, "task": task, "dataset": dataset_ref,
                           "events": events},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        # A multi-GPU fold on one node (NCCL over NVLink/PCIe, not the network), unless the
        # user lets it spread; CPU workers pack where they can.
        scaling_config=ScalingConfig(num_workers=task.workers, use_gpu=use_gpu,
                                     resources_per_worker=resources,
                                     placement_strategy="STRICT_PACK" if use_gpu and not task.workers_across_nodes
                                     else "PACK"),
        run_config=RunConfig(
            # Shown in the Ray dashboard's Train view. Nothing is stored through Ray Train (the
            # backend mirrors its checkpoints itself), so its folder is node-local scratch.
            name=f"kfold-ray-{task.run_name}-fold{task.fold}-try{task.attempt}",
            storage_path=scratch,
            failure_config=FailureConfig(max_failures=0, max_preemption_failures=0),
        ),
    )


def _worker_loop(config: dict[str, Any]) -> None:
    """One Ray Train worker: the backend's fold with this worker's place; events to the queue."""
    import dataclasses

    import ray
    import ray.train
    import torch

    context = ray.train.get_context()
    worker = FoldWorker(rank=context.get_world_rank(), world_size=context.get_world_size(),
                        local_rank=context.get_local_rank(),
                        local_world_size=context.get_local_world_size(),
                        node_rank=context.get_node_rank())
    if torch.cuda.is_available():
        # Ray Train shows each worker its node's training GPUs; "cuda" must mean this worker's.
        from ray.train.torch import get_device

        torch.cuda.set_device(get_device())
    task = dataclasses.replace(config["task"], worker=worker)
    dataset = config["dataset"]
    if isinstance(dataset, ray.ObjectRef):
        dataset = ray.get(dataset)
    gpus = ray.get_gpu_ids()  # each worker charts its own GPU
    stop = GpuUtilization(task.run_name, task.fold, gpus).start() if gpus else None
    try:
        for event in config["backend"].run_fold(task, dataset):
            config["events"].put((worker.rank, event))
    finally:
        if stop is not None:
            stop.set()


def worker_error(error: BaseException) -> BaseException:
    """The error that says why the fold failed, not Ray Train's wrapper: the driver decides from
    its type whether a retry can help. When one rank fails the others fail too (a collective
    whose peer is gone), so ours (an out-of-memory, an unreadable image) come first, then other
    errors raised in a worker, then Ray's (a worker process that died), lowest rank first."""
    failures = getattr(error, "worker_failures", None)
    if not failures:
        return error
    from ray.exceptions import RayError

    def weight(item: tuple[int, BaseException]) -> tuple[int, int]:
        rank, e = item
        return (0 if isinstance(e, KfoldRayError) else 2 if isinstance(e, RayError) else 1, rank)

    return min(failures.items(), key=weight)[1]
