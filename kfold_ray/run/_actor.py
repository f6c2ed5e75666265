"""The fold actor: one Ray actor process per fold, which trains and streams its predictions
(or, for a fold trained by several workers, runs their Ray Train group and forwards their
events: `kfold_ray.run._workers`).

One fold per process because Detectron2 trainers do not give GPU memory back within a process
(detectron2 #4007, ray #11608): the driver kills the actor when its fold is done. This module is
imported by reference in the workers (never pickled by value), so Detectron2 registrations made
here land in the worker's real catalogs.
"""

from __future__ import annotations

from typing import Iterator

import ray
from ray.util import metrics

from .._backend import FoldBackend, FoldEvent, FoldTask, Progress
from ..data._dataset import CocoDataset

_TAGS = ("run", "fold")


class _FoldMetrics:
    """Ray metrics of a fold, shown by the Ray dashboard (Metrics tab, with Prometheus/Grafana)
    and always scrapeable from each node's metrics endpoint."""

    def __init__(self, run: str, fold: int) -> None:
        self.tags = {"run": run, "fold": str(fold)}
        self.iteration = metrics.Gauge("kfold_ray_train_iteration", "training iteration of a fold", tag_keys=_TAGS)
        self.loss = metrics.Gauge("kfold_ray_train_loss", "total training loss of a fold", tag_keys=_TAGS)
        self.predicted = metrics.Gauge("kfold_ray_images_predicted", "held-out images predicted", tag_keys=_TAGS)

    def record(self, event: Progress) -> None:
        if event.stage == "train":
            self.iteration.set(event.step, tags=self.tags)
            if event.loss is not None:
                self.loss.set(event.loss, tags=self.tags)
        else:
            self.predicted.set(event.step, tags=self.tags)


class FoldActor:
    """Runs one fold with a backend; `run` is a Ray streaming generator of FoldEvents."""

    def __init__(self, backend: FoldBackend) -> None:
        self.backend = backend

    def run(self, task: FoldTask, dataset: CocoDataset) -> Iterator[FoldEvent]:
        fold_metrics = _FoldMetrics(task.run_name, task.fold)
        if task.workers > 1:
            from ._workers import run_on_workers

            events = run_on_workers(self.backend, task, dataset)
        else:
            events = self.backend.run_fold(task, dataset)
        for event in events:
            if isinstance(event, Progress):
                fold_metrics.record(event)
            yield event

    def ping(self) -> bool:
        return True


RemoteFoldActor = ray.remote(FoldActor)
