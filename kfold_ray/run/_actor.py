"""The fold actor: one Ray actor process per fold, which trains and streams its predictions
(or, for a fold trained by several workers, runs their Ray Train group and forwards their
events: `kfold_ray.run._workers`), and sets the fold's Ray metrics (`_fold_metrics`).

One fold per process because Detectron2 trainers do not give GPU memory back within a process
(detectron2 #4007, ray #11608): the driver kills the actor when its fold is done. This module is
imported by reference in the workers (never pickled by value), so Detectron2 registrations made
here land in the worker's real catalogs.
"""

from __future__ import annotations

from typing import Iterator

import ray

from .._backend import FoldBackend, FoldEvent, FoldTask, Progress
from ..data._dataset import CocoDataset
from ._fold_metrics import FoldMetrics


class FoldActor:
    """Runs one fold with a backend; `run` is a Ray streaming generator of FoldEvents."""

    def __init__(self, backend: FoldBackend) -> None:
        self.backend = backend

    def run(self, task: FoldTask, dataset: CocoDataset) -> Iterator[FoldEvent]:
        # A fold of several workers: its GPUs are theirs (each samples its own), not the actor's.
        gpu_ids = ray.get_gpu_ids() if task.workers == 1 else ()
        fold_metrics = FoldMetrics(task.run_name, task.fold, gpu_ids)
        if task.workers > 1:
            from ._workers import run_on_workers

            events = run_on_workers(self.backend, task, dataset)
        else:
            events = self.backend.run_fold(task, dataset)
        try:
            for event in events:
                if isinstance(event, Progress):
                    fold_metrics.record(event)
                yield event
        finally:
            fold_metrics.close()

    def ping(self) -> bool:
        return True


RemoteFoldActor = ray.remote(FoldActor)
