"""A fold's streamed prediction parts in the run's storage: one Arrow IPC file per batch.

Layout (names from `kfold_ray.storage._rundir`)::

    parts/fold_000/00000000.arrow   one streamed batch (schema metadata keeps its image indices)
    parts/fold_000/00000001.arrow
    parts/fold_000/DONE.json        written once the fold finished predicting
    parts/fold_001/...

Only Arrow IPC and JSON files are ever read back; leftover ``*.tmp`` files of an interrupted
write are ignored.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pyarrow as pa

from .._exceptions import StitchError
from .._schema import (
    DETECTION_SCHEMA,
    batch_box_losses,
    batch_fold,
    batch_image_indices,
    batch_model,
)
from ..storage import _rundir
from ..storage._storage import Storage
from ._stitch import SHOWN, shown_indices

__all__ = ["FoldPartStore", "check_batch", "unique_indices"]

_PART_RE = re.compile(r"^(\d{8})\.arrow$")
_DONE = _rundir.DONE


class FoldPartStore:
    """The persisted prediction batches of every fold, under ``parts/`` of the run's storage.

    With an object store, the parts this process writes are also kept in a local cache folder:
    stitching then reads them from the local disk (memory-mapped), and only the parts of earlier
    sessions (a resumed run) come back over the network.
    """

    def __init__(self, run_dir: Storage | str | os.PathLike[str], *,
                 cache_dir: str | os.PathLike[str] | None = None) -> None:
        self.storage = run_dir if isinstance(run_dir, Storage) else Storage(run_dir)
        self.cache = Path(cache_dir) if cache_dir is not None and not self.storage.is_local else None

    # ---- names ------------------------------------------------------------------------------
    def fold_dir(self, fold: int) -> str:
        return _rundir.fold_parts(fold)

    def folds(self) -> list[int]:
        """Folds with a parts folder in storage, ascending."""
        found = []
        for name in self.storage.list_names(_rundir.PARTS):
            m = re.fullmatch(r"fold_(\d{3,})", name)
            if m:
                found.append(int(m.group(1)))
        return sorted(found)

    def part_paths(self, fold: int) -> list[str]:
        """The fold's finished part names in ``seq`` order (``*.tmp`` leftovers are skipped)."""
        d = self.fold_dir(fold)
        parts = [(int(m.group(1)), f"{d}/{n}") for n in self.storage.list_names(d)
                 if (m := _PART_RE.match(n))]
        return [p for _, p in sorted(parts)]

    # ---- writing ----------------------------------------------------------------------------
    def put(self, batch: pa.RecordBatch, *, seq: int) -> str:
        """Persist one batch as ``parts/fold_XXX/{seq:08d}.arrow``, atomically; return its name.

        The fold comes from the batch's metadata. Writing the same ``seq`` again replaces the file.
        """
        check_batch(batch)
        if not 0 <= seq < 10**8:
            raise ValueError(f"seq must be in [0, 1e8), got {seq}")
        name = f"{self.fold_dir(batch_fold(batch))}/{seq:08d}.arrow"
        sink = pa.BufferOutputStream()
        with pa.ipc.new_file(sink, batch.schema) as writer:
            writer.write_batch(batch)
        data = sink.getvalue().to_pybytes()
        self.storage.write_bytes(name, data)
        if self.cache is not None:
            cached = self.cache / name
            cached.parent.mkdir(parents=True, exist_ok=True)
            cached.write_bytes(data)  # after the upload: the cache never holds what storage lacks
        return name

    def _open(self, name: str) -> pa.NativeFile:
        if self.cache is not None and (self.cache / name).is_file():
            return pa.memory_map(str(self.cache / name), "r")
        return self.storage.open_input_file(name)

    def mark_fold_done(self, fold: int, info: Mapping[str, Any]) -> str:
        """Write ``parts/fold_XXX/DONE.json`` (atomically): the fold predicted all its images."""
        name = f"{self.fold_dir(fold)}/{_DONE}"
        self.storage.write_json(name, dict(info))
        return name

    def clear_fold(self, fold: int) -> None:
        """Delete a fold's parts and DONE marker (e.g. before re-predicting it with a new model)."""
        for p in self.part_paths(fold):
            self.storage.delete(p)
            if self.cache is not None:
                (self.cache / p).unlink(missing_ok=True)
        self.storage.delete(f"{self.fold_dir(fold)}/{_DONE}")

    # ---- reading ----------------------------------------------------------------------------
    def is_fold_done(self, fold: int) -> bool:
        return self.storage.is_file(f"{self.fold_dir(fold)}/{_DONE}")

    def fold_done_info(self, fold: int) -> dict[str, Any] | None:
        name = f"{self.fold_dir(fold)}/{_DONE}"
        if not self.storage.is_file(name):
            return None
        return self.storage.read_json(name)

    def next_seq(self, fold: int) -> int:
        """One past the highest ``seq`` persisted for ``fold`` (0 for a fold with no part)."""
        parts = self.part_paths(fold)
        return int(_PART_RE.match(parts[-1].rsplit("/", 1)[-1]).group(1)) + 1 if parts else 0

    def covered_images(self, fold: int) -> np.ndarray:
        """int64 sorted unique: images the fold's persisted parts cover (read from metadata only)."""
        return unique_indices(self.part_index(fold)[0])

    def part_index(self, fold: int) -> tuple[list[np.ndarray], set[str]]:
        """(each part's image indices, the models that made them), from one metadata read per
        part (a resumed driver's one look at what a fold already persisted)."""
        images, models = [], set()
        for name in self.part_paths(fold):
            schema = self._part_schema(name)
            images.append(batch_image_indices(schema.empty_table()))
            models.add(batch_model(schema))
        return images, models

    def read_fold(self, fold: int, *, box_losses: list[pa.Table] | None = None
                  ) -> tuple[pa.Table, np.ndarray]:
        """(detections, image indices) of every part of ``fold`` in ``seq`` order.

        The table is memory-mapped on a local disk (no copy) and carries no schema metadata. The
        image indices are concatenated as persisted, duplicates kept, so that `stitch` can report
        them. With ``box_losses``, the losses the parts carry are appended to it (checked against
        their part's images) in the same pass.
        """
        tables, images = [], []
        for name in self.part_paths(fold):
            table = self._read_part(name)
            if batch_fold(table) != fold:
                raise StitchError(
                    f"{self.storage.uri_of(name)}: holds a batch of fold {batch_fold(table)}, not fold {fold}"
                )
            images.append(batch_image_indices(table))
            if box_losses is not None and (losses := _part_losses(table.schema, self.storage.uri_of(name))):
                box_losses.append(losses)
            tables.append(table.replace_schema_metadata(None))
        if not tables:
            return DETECTION_SCHEMA.empty_table(), np.empty(0, dtype=np.int64)
        return pa.concat_tables(tables), np.concatenate(images)

    def _read_part(self, name: str) -> pa.Table:
        try:
            table = pa.ipc.open_file(self._open(name)).read_all()
        except (pa.ArrowInvalid, OSError) as e:
            raise StitchError(f"{self.storage.uri_of(name)}: unreadable prediction part: {e}") from e
        check_batch(table)
        _check_rows_in_batch(table, self.storage.uri_of(name))
        return table

    def _part_schema(self, name: str) -> pa.Schema:
        try:
            return pa.ipc.open_file(self._open(name)).schema
        except (pa.ArrowInvalid, OSError) as e:
            raise StitchError(f"{self.storage.uri_of(name)}: unreadable prediction part: {e}") from e

    def read_box_losses(self, fold: int) -> pa.Table | None:
        """The box losses the fold's parts carry (BOX_LOSS_SCHEMA), or None when none do. Each
        row must belong to an image of its own part (else StitchError)."""
        tables = [t for name in self.part_paths(fold)
                  if (t := _part_losses(self._part_schema(name), self.storage.uri_of(name)))]
        return pa.concat_tables(tables) if tables else None

    def models(self, fold: int) -> set[str]:
        """The models that made the fold's persisted parts (read from metadata only)."""
        return self.part_index(fold)[1]


def unique_indices(chunks: list[np.ndarray]) -> np.ndarray:
    return np.unique(np.concatenate(chunks)) if chunks else np.empty(0, dtype=np.int64)


def _part_losses(schema: pa.Schema, where: str) -> pa.Table | None:
    """The box losses a part carries, each row checked to belong to one of the part's images."""
    losses = batch_box_losses(schema)
    if losses is None:
        return None
    outside = ~np.isin(losses.column("image_index").to_numpy(),
                       batch_image_indices(schema.empty_table()))
    if outside.any():
        raise StitchError(f"{where}: {int(outside.sum())} box losses for images the part does not cover")
    return losses


def _check_rows_in_batch(table: pa.Table, where: str) -> None:
    """Every detection row belongs to an image the part says it covers: a row for another image
    would be counted for an image whose own batch never said it was predicted."""
    rows = table.column("image_index").to_numpy()
    outside = ~np.isin(rows, batch_image_indices(table))
    if outside.any():
        raise StitchError(
            f"{where}: {int(outside.sum())} detections for images the part does not cover: "
            f"images {shown_indices(np.unique(rows[outside]))}",
            wrong_fold=np.unique(rows[outside])[:SHOWN].tolist(),
        )


def check_batch(batch: pa.RecordBatch | pa.Table) -> None:
    if not batch.schema.equals(DETECTION_SCHEMA, check_metadata=False):
        raise StitchError(
            f"prediction batch has schema {batch.schema.names}, expected DETECTION_SCHEMA "
            f"{DETECTION_SCHEMA.names} (build batches with make_prediction_batch)"
        )
    try:
        batch_fold(batch)
        batch_image_indices(batch)
    except (KeyError, TypeError, ValueError) as e:
        raise StitchError(
            "prediction batch lacks its fold / image indices metadata "
            "(build batches with make_prediction_batch)"
        ) from e


