"""Test-only fold backends (never reachable from the product's code path).

`EchoBackend` "predicts" each held-out image's own ground-truth boxes (score 0.9) plus one
low-score false positive, fast and deterministic, so orchestration tests (scheduling, streaming,
retries, node loss, resume, load) run without training. Faults are injected through files in a
control folder, so that a restarted actor process sees what already happened.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa

from kfold_ray._backend import DiscardParts, FoldEvent, FoldTask, Progress, worker_share
from kfold_ray._config import TrainConfig
from kfold_ray.data._dataset import CocoDataset
from kfold_ray.detectron2 import Detectron2Backend
from kfold_ray._exceptions import FoldOutOfMemoryError
from kfold_ray._schema import make_prediction_batch


@dataclass
class EchoBackend:
    """Args:
        train_steps: fake training iterations (each sleeps ``step_s``).
        step_s: seconds per fake iteration / per predicted batch.
        control_dir: where fault flags and the attempt log live.
        crash_fold: this fold's process dies (os._exit) once, at ``crash_at`` = ("train", step)
            or ("predict", images done).
        fail_fold: this fold raises RuntimeError every time (a failure that may be transient to
            kfold-ray, hence retried).
        fail_with: ``{fold: exception class}``: that fold raises it every time (NotImplementedError,
            ValueError, ...: a bug that recurs; OSError: maybe a storage hiccup).
        oom_fold: this fold reports running out of GPU memory.
        pause_folds: these folds wait until ``control_dir/release`` exists before predicting.
        hold_at_end: every fold (each worker of one) writes ``control_dir/held_<fold>_<rank>``
            after its last batch, then waits until ``control_dir/release`` exists: its actor,
            metrics and Train run stay alive for a test to look at.
        skip_image_of_fold: this fold's stream ends without its last held-out image (a backend
            bug the driver must catch: never DONE).
        new_model_each_attempt: every attempt "trains again" (model ``attempt<n>``), as when a
            fold's final checkpoint was lost: it must discard earlier parts, as the real one does.
    """

    train_steps: int = 3
    step_s: float = 0.0
    control_dir: str | None = None
    crash_fold: int | None = None
    crash_at: tuple[str, int] = ("train", 2)
    fail_fold: int | None = None
    fail_with: dict[int, type] | None = None
    pause_folds: tuple[int, ...] = ()
    oom_fold: int | None = None
    new_model_each_attempt: bool = False
    skip_image_of_fold: int | None = None
    hold_at_end: bool = False

    def validate(self, train: TrainConfig, dataset: CocoDataset, *, workers: int = 1) -> None:
        return None

    def run_fold(self, task: FoldTask, dataset: CocoDataset) -> Iterator[FoldEvent]:
        self._log(f"start fold={task.fold} attempt={task.attempt} n={len(task.predict_indices)}")
        if task.fold == self.fail_fold:
            raise RuntimeError(f"deterministic failure in fold {task.fold}")
        if self.fail_with and task.fold in self.fail_with:
            raise self.fail_with[task.fold](f"deterministic failure in fold {task.fold}")
        if task.fold == self.oom_fold:
            raise FoldOutOfMemoryError(task.fold, "predicting", task.predict.batch_size, "lower --batch-size")
        for step in range(1, self.train_steps + 1):
            time.sleep(self.step_s)
            self._maybe_crash(task.fold, "train", step)
            yield Progress(task.fold, "train", step, self.train_steps, 1.0 / step)
        if task.fold in self.pause_folds:
            while not Path(self.control_dir, "release").exists():
                time.sleep(0.05)
        done = 0
        # A fold of several workers: each "predicts" its share, as the real backend does.
        indices = worker_share(np.asarray(task.predict_indices, dtype=np.int64), task.worker)
        if task.fold == self.skip_image_of_fold:
            indices = indices[:-1]
        model = f"attempt{task.attempt}" if self.new_model_each_attempt else ""
        if model and task.predicted_with and task.predicted_with != model:
            yield DiscardParts(task.fold, model)
            indices = np.asarray(task.holdout_indices, dtype=np.int64)
        for lo in range(0, len(indices), task.predict.batch_size):
            chunk = indices[lo:lo + task.predict.batch_size]
            self._maybe_crash(task.fold, "predict", done)
            time.sleep(self.step_s)
            yield echo_batch(task.fold, chunk, dataset, model)
            done += len(chunk)
            yield Progress(task.fold, "predict", done, len(indices))
        if self.hold_at_end:
            rank = task.worker.rank if task.worker else 0
            Path(self.control_dir, f"held_{task.fold}_{rank}").write_text(str(os.getpid()))
            while not Path(self.control_dir, "release").exists():
                time.sleep(0.05)

    def _maybe_crash(self, fold: int, stage: str, step: int) -> None:
        if fold != self.crash_fold or (stage, step) != tuple(self.crash_at):
            return
        flag = Path(self.control_dir, f"crashed_{fold}")
        if not flag.exists():
            flag.write_text(str(os.getpid()))
            os._exit(1)  # the actor's process dies, as on a segfault or OOM kill

    def _log(self, line: str) -> None:
        if self.control_dir:
            with open(Path(self.control_dir, "attempts.log"), "a") as f:
                f.write(line + "\n")


def echo_batch(fold: int, chunk: np.ndarray, dataset: CocoDataset, model: str = ""):
    owners, boxes, classes, scores = [], [], [], []
    for i in chunk.tolist():
        b, c, crowd = dataset.annotations_of(i)
        b, c = b[~crowd], c[~crowd]
        owners += [i] * (len(b) + 1)
        boxes += [b, np.array([[1, 1, 9, 9]], np.float32)]
        classes += [c, np.array([0])]
        scores += [np.full(len(b), 0.9, np.float32), np.array([0.1], np.float32)]
    return make_prediction_batch(
        fold=fold, image_indices=chunk, det_image_index=np.array(owners, np.int64),
        boxes=np.concatenate(boxes) if boxes else np.zeros((0, 4)),
        scores=np.concatenate(scores) if scores else np.zeros(0),
        classes=np.concatenate(classes) if classes else np.zeros(0),
        image_ids=dataset.image_ids, category_ids=dataset.category_ids, model=model,
    )


def attempts(control_dir: Path) -> list[str]:
    path = Path(control_dir, "attempts.log")
    return path.read_text().splitlines() if path.exists() else []


def wait_for(predicate, timeout_s: float = 180.0, what: str = "condition") -> None:
    """Poll ``predicate`` until true; fail the test after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


class KillMidUploadBackend(Detectron2Backend):
    """The product's Detectron2 backend, except that fold ``fold``'s process is SIGKILLed halfway
    through copying checkpoint ``upload`` into the run dir, once (``control_dir/killed`` records
    it): a crash in the middle of a background checkpoint upload, as an OOM kill or a lost node
    would leave it. Everything else is the real backend."""

    def __init__(self, control_dir: str, *, fold: int = 0, upload: str = "model_0000003.pth") -> None:
        self.control_dir, self.fold, self.upload = control_dir, fold, upload

    def run_fold(self, task: FoldTask, dataset: CocoDataset) -> Iterator[FoldEvent]:
        flag = Path(self.control_dir, "killed")
        if task.fold == self.fold and not flag.exists():
            _kill_while_copying(self.upload, flag)
        yield from super().run_fold(task, dataset)


def _kill_while_copying(name: str, flag: Path) -> None:
    """From now on, in this process: a copy of a file called ``name`` (a local run dir's upload,
    `Storage.put_file`) writes half of it, then the process dies."""
    import shutil
    import signal

    original = shutil.copyfile

    def copyfile(src, dst, *args, **kwargs):
        if Path(src).name != name:
            return original(src, dst, *args, **kwargs)
        data = Path(src).read_bytes()
        with open(dst, "wb") as f:
            f.write(data[: len(data) // 2])
            f.flush()
        flag.write_text(f"killed while uploading {name} ({len(data) // 2} of {len(data)} bytes)")
        os.kill(os.getpid(), signal.SIGKILL)

    shutil.copyfile = copyfile
@dataclass
class TruthEchoBackend(EchoBackend):
    """EchoBackend, but echoing another annotations file (the truth) with a confident score.

    EchoBackend echoes the labels the run was given (so it cannot disagree with them) at 0.9, below
    cleanlab's 0.95 threshold for swapped and overlooked boxes.
    """

    truth_annotations: str = ""
    truth_images: str = ""
    score: float = 0.99

    def run_fold(self, task, dataset):
        from kfold_ray.data._dataset import load_coco

        truth = load_coco(self.truth_annotations, self.truth_images, check_images=False)
        for event in super().run_fold(task, truth):
            if isinstance(event, pa.RecordBatch):
                scores = event.column("score").to_numpy()
                confident = np.where(scores >= 0.9, self.score, scores).astype(np.float32)
                columns = [pa.array(confident) if name == "score" else event.column(name)
                           for name in event.schema.names]
                event = pa.RecordBatch.from_arrays(columns, schema=event.schema)  # keeps metadata
            yield event
