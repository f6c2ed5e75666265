"""Stage "reducer": persist fold prediction batches as they stream in, then stitch them.

Folds run side by side and their batches arrive interleaved. The driver hands each batch to
`Reducer.add`, which writes it at once to the run's storage (`kfold_ray.run._parts`: one Arrow IPC
file per batch, written atomically; a local folder or an object store) and keeps only per-fold
counts in memory. When every fold is done, `Reducer.finish` reads the parts back (memory-mapped,
no copy) and `kfold_ray.run._stitch.stitch` checks that they form a partition of the dataset in
which each image was predicted by the one fold that held it out, then returns one table in
dataset order.
"""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)

from .._schema import batch_fold, batch_image_indices, batch_model
from ..storage._storage import Storage
from ._parts import FoldPartStore, check_batch, unique_indices
from ._stitch import stitch

__all__ = ["Reducer"]


# ---- the driver's entry point -------------------------------------------------------------------
class Reducer:
    """Persist prediction batches as they arrive (any fold, any order), then stitch them.

    Batches go to the run's ``parts/`` at once; only each batch's image indices and model stay
    in memory, so the driver's questions at every fold launch and end (which images are covered,
    by which model) never re-read the parts. A run dir that already holds parts (a resumed run)
    is read once per fold, from part metadata: counts and sequence numbers continue.
    Call it from one thread (the driver's consuming loop).

    On an object store one upload is a round trip (~15 ms to moto here, more to S3), which would
    cap the driver at a few dozen batches/s: up to ``uploads`` batches are then uploaded side by
    side, in background threads. A fold is marked DONE, its covered images counted and the parts
    read back only after its uploads have all landed, so nothing counts as persisted before it is.
    """

    def __init__(self, run_dir: Storage | str | os.PathLike[str], *,
                 cache_dir: str | os.PathLike[str] | None = None, uploads: int = 8) -> None:
        self.store = FoldPartStore(run_dir, cache_dir=cache_dir)
        self._next_seq: dict[int, int] = {}
        self._images: dict[int, int] = {}
        self._detections: dict[int, int] = {}
        self._covered: dict[int, list[np.ndarray]] = {}  # per fold: each part's image indices
        self._models: dict[int, set[str]] = {}  # per fold: the models that made its parts
        self._box_losses: pa.Table | None = None  # collected by `finish`
        self._on_disk = self.store.folds()  # counted when first asked for (reads part metadata)
        self._uploads = uploads if not self.store.storage.is_local else 0
        self._pool = ThreadPoolExecutor(self._uploads, "kfold-ray-upload") if self._uploads else None
        self._pending: deque[tuple[int, Future]] = deque()

    def _load_fold(self, fold: int) -> None:
        self._next_seq[fold] = self.store.next_seq(fold)
        self._covered[fold], self._models[fold] = self.store.part_index(fold)
        self._images[fold] = int(unique_indices(self._covered[fold]).size)
        self._detections.setdefault(fold, 0)

    def add(self, batch: pa.RecordBatch) -> str:
        """Persist one batch (or start its upload); return the part's name."""
        check_batch(batch)
        fold = batch_fold(batch)
        if fold not in self._next_seq:
            self.flush(fold)
            self._load_fold(fold)
        seq = self._next_seq[fold]
        name = f"{self.store.fold_dir(fold)}/{seq:08d}.arrow"
        if self._pool is None:
            self.store.put(batch, seq=seq)
        else:
            while len(self._pending) >= 2 * self._uploads:
                self._pending.popleft()[1].result()  # bounded: raises an upload's error here
            self._pending.append((fold, self._pool.submit(self.store.put, batch, seq=seq)))
        self._next_seq[fold] += 1
        self._covered[fold].append(batch_image_indices(batch))
        self._models[fold].add(batch_model(batch))
        self._images[fold] += int(batch_image_indices(batch).size)
        self._detections[fold] += batch.num_rows
        return name

    def flush(self, fold: int | None = None) -> None:
        """Wait until the uploads (of ``fold``, or all) have landed; raise the first error."""
        keep: deque[tuple[int, Future]] = deque()
        while self._pending:
            f, future = self._pending.popleft()
            if fold is None or f == fold:
                future.result()
            else:
                keep.append((f, future))
        self._pending = keep

    def _known(self, fold: int) -> None:
        """Wait for the fold's uploads (an upload's error surfaces here); read it in once."""
        self.flush(fold)
        if fold not in self._next_seq:
            self._load_fold(fold)

    def covered_images(self, fold: int) -> np.ndarray:
        """int64 sorted: the fold's images whose predictions are persisted."""
        self._known(fold)
        return unique_indices(self._covered[fold])

    def predicted_with(self, fold: int) -> str:
        """The one model that made the fold's persisted parts; "" if none (or not said);
        "mixed" if several (never equal to a model: the fold is predicted again)."""
        self._known(fold)
        models = self._models[fold] - {""}
        return "" if not models else next(iter(models)) if len(models) == 1 else "mixed"

    def discard_fold(self, fold: int) -> None:
        """Delete the fold's parts (made by another model than the one predicting it now)."""
        self.flush(fold)
        self.store.clear_fold(fold)
        self._next_seq[fold], self._images[fold], self._detections[fold] = 0, 0, 0
        self._covered[fold], self._models[fold] = [], set()

    def images_received(self, fold: int) -> int:
        """Images received so far for ``fold`` (including parts from before a resume)."""
        if fold not in self._images and self.store.storage.is_dir(self.store.fold_dir(fold)):
            self._load_fold(fold)
        return self._images.get(fold, 0)

    def progress(self) -> dict[int, int]:
        """fold -> images received so far, for every fold seen (in this process or on disk)."""
        for fold in self._on_disk:
            if fold not in self._images:
                self._load_fold(fold)
        return dict(sorted(self._images.items()))

    def detections_received(self, fold: int) -> int:
        """Detections received by this process for ``fold`` (parts from before a resume not counted)."""
        return self._detections.get(fold, 0)

    def mark_fold_done(self, fold: int, info: Mapping[str, Any]) -> str:
        self.flush(fold)
        return self.store.mark_fold_done(fold, info)

    def finish(self, fold_of_image: np.ndarray, num_images: int) -> pa.Table:
        """Read every fold's parts back and `stitch` them (see there for checks and order)."""
        self.close()
        fold_of_image = np.asarray(fold_of_image)
        folds = set(np.unique(fold_of_image).tolist()) | set(self.store.folds())
        losses: list[pa.Table] = []  # collected in the same pass over the parts
        table = stitch({f: self.store.read_fold(f, box_losses=losses) for f in sorted(folds)},
                       fold_of_image, num_images)
        if losses:
            merged = pa.concat_tables(losses)
            self._box_losses = merged.take(pa.compute.sort_indices(
                merged, [("image_index", "ascending"), ("ann_row", "ascending")]))
        return table

    def box_losses(self) -> pa.Table | None:
        """Every fold's box losses, sorted by image then annotation row, as `finish` read them
        (after its partition checks); None if no part carried any."""
        return self._box_losses

    def close(self) -> None:
        """Wait for every upload, then stop the upload threads."""
        try:
            self.flush()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None
                self._uploads = 0
