"""Stage "outputs": write the stitched predictions in the formats the next tools read.

Files written into the run dir (each atomically: a crash never leaves a half-written final name):

    predictions.parquet        one row per detection, DETECTION_SCHEMA columns (fold id included)
    cleanlab_predictions.pkl   cleanlab's object-detection ``predictions`` (see `cleanlab_predictions`)
    cleanlab_labels.pkl        cleanlab's object-detection ``labels`` (``dataset.cleanlab_labels()``)
    coco_results.json          COCO results, loadable with ``pycocotools.coco.COCO.loadRes``
    categories.json            ``[{"class_index", "id", "name"}]``: class index <-> COCO category

Both pickles load with plain ``pickle.load`` (numpy only, kfold-ray not needed).

At COCO-train scale (118k images x 100 detections x 80 classes) the cleanlab predictions are
~6.8M small arrays; pickling them one by one takes over a minute. Both pickles are instead
written in bulk by `kfold_ray.outputs._pickles` (one base array, each small array a slice of it), and the
COCO results JSON is formatted column-wise with numpy, not one ``json.dumps`` per row. A
background thread writes each block while the next is built.
"""

from __future__ import annotations

import os
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .._schema import BOX_LOSS_SCHEMA, DETECTION_SCHEMA
from ..storage._atomic import atomic_path, write_json
from ..storage._rundir import (
    BOX_LOSSES_PARQUET,
    CATEGORIES,
    CLEANLAB_LABELS,
    CLEANLAB_PREDICTIONS,
    COCO_RESULTS,
    PREDICTIONS_PARQUET,
)
from ..storage._storage import Storage
from ._pickles import dump_dict_slices, dump_nested_slices

if TYPE_CHECKING:
    from ..data._dataset import CocoDataset

__all__ = [
    "OutputPaths",
    "cleanlab_predictions",
    "write_all",
    "write_box_losses",
    "write_categories",
    "write_cleanlab_labels",
    "write_cleanlab_predictions",
    "write_coco_results",
    "write_predictions_parquet",
]


# Blocks stay under glibc's 32 MB mmap threshold, so their memory is reused rather than mapped and
# faulted in afresh each time (page faults cost as much as the formatting on small VMs).
_ROW_CHUNK = 100_000  # detections per block of the COCO results JSON (~10 MB)


@dataclass(frozen=True)
class OutputPaths:
    """Where each output landed: Paths in a local run dir, URIs in an object store."""

    predictions_parquet: Path | str
    cleanlab_predictions: Path | str
    cleanlab_labels: Path | str
    coco_results: Path | str
    categories: Path | str


def write_all(run_dir: Storage | str | os.PathLike[str], table: pa.Table, dataset: CocoDataset
              ) -> OutputPaths:
    """Write every output file of a stitched prediction table into ``run_dir``.

    Args:
        run_dir: the run's storage, or a local folder / URI (created if needed). Each file is
            written locally (beside its final name, or in a staging folder for an object
            store) and lands under its final name only when complete.
        table: stitched detections (`kfold_ray.run._reduce.stitch`), DETECTION_SCHEMA columns.
        dataset: the dataset the predictions are for (image count, classes, labels).
    """
    storage = run_dir if isinstance(run_dir, Storage) else Storage(run_dir)
    writers = {
        PREDICTIONS_PARQUET: lambda p: write_predictions_parquet(p, table),
        CLEANLAB_PREDICTIONS: lambda p: write_cleanlab_predictions(
            p, table, num_images=dataset.num_images, num_classes=dataset.num_classes),
        CLEANLAB_LABELS: lambda p: write_cleanlab_labels(p, dataset),
        COCO_RESULTS: lambda p: write_coco_results(p, table),
        CATEGORIES: lambda p: write_categories(p, dataset),
    }
    for name, write in writers.items():
        with storage.staged(name) as tmp:
            write(tmp)
    where = (lambda name: Path(storage.path(name))) if storage.is_local else storage.uri_of
    return OutputPaths(
        predictions_parquet=where(PREDICTIONS_PARQUET),
        cleanlab_predictions=where(CLEANLAB_PREDICTIONS),
        cleanlab_labels=where(CLEANLAB_LABELS),
        coco_results=where(COCO_RESULTS),
        categories=where(CATEGORIES),
    )


def write_box_losses(run_dir: Storage | str | os.PathLike[str], losses: pa.Table,
                     dataset: CocoDataset, fold_of_image: np.ndarray) -> None:
    """``box_losses.parquet``: one row per given (non-crowd) box of every image, with the losses
    of the model that held the image out (BOX_LOSS_SCHEMA, plus the ids a person looks up)."""
    storage = run_dir if isinstance(run_dir, Storage) else Storage(run_dir)
    rows = losses.column("ann_row").to_numpy()
    images = losses.column("image_index").to_numpy()
    table = pa.table({
        "image_index": images,
        "image_id": dataset.image_ids[images],
        "annotation_id": dataset.ann_ids[rows],
        "category_id": dataset.category_ids[dataset.classes[rows]],
        "class_index": dataset.classes[rows].astype(np.int32),
        "fold": np.asarray(fold_of_image)[images].astype(np.int32),
        **{name: losses.column(name) for name in BOX_LOSS_SCHEMA.names[2:]
           if name in losses.column_names},
    })
    with storage.staged(BOX_LOSSES_PARQUET) as tmp:
        pq.write_table(table, tmp, compression="zstd")


# ---- parquet, labels, categories -----------------------------------------------------------------
def write_predictions_parquet(path: str | Path, table: pa.Table) -> Path:
    """One row per detection with the DETECTION_SCHEMA columns (absolute pixel xyxy boxes)."""
    _check_table(table)
    table = table.select(DETECTION_SCHEMA.names).cast(DETECTION_SCHEMA).replace_schema_metadata(None)
    with atomic_path(path) as tmp:
        # Dictionary-encode only the few-valued columns: trying it on 11.8M distinct floats
        # doubles the write time for nothing.
        pq.write_table(
            table, tmp, compression="zstd", row_group_size=1 << 20,
            use_dictionary=["fold", "class_index", "category_id"],
        )
    return Path(path)


def write_cleanlab_labels(path: str | Path, dataset: CocoDataset) -> Path:
    """Pickle what ``dataset.cleanlab_labels()`` returns: cleanlab's ``labels`` argument.

    A list over images of ``{"bboxes": float32 (L, 4) [x1, y1, x2, y2], "labels": int64 (L,)}``,
    crowd boxes left out. Written in bulk (see `kfold_ray.outputs._pickles`); loads with ``pickle.load``.
    """
    keep = ~np.asarray(dataset.iscrowd, dtype=bool)
    kept_before = np.concatenate([[0], np.cumsum(keep)])
    arrays = {
        "bboxes": np.ascontiguousarray(dataset.boxes[keep], dtype=np.float32).reshape(-1, 4),
        "labels": np.asarray(dataset.classes[keep], dtype=np.int64),
    }
    with atomic_path(path) as tmp, _BackgroundWriter(tmp) as f:
        dump_dict_slices(
            f, arrays, kept_before[dataset.ann_offsets[:-1]], kept_before[dataset.ann_offsets[1:]]
        )
    return Path(path)


def write_categories(path: str | Path, dataset: CocoDataset) -> Path:
    """``[{"class_index": c, "id": coco_category_id, "name": name}]`` in class-index order."""
    write_json(path, [
        {"class_index": i, "id": int(c.id), "name": c.name} for i, c in enumerate(dataset.categories)
    ])
    return Path(path)


def _check_table(table: pa.Table) -> None:
    missing = [n for n in DETECTION_SCHEMA.names if n not in table.column_names]
    if missing:
        raise ValueError(f"prediction table lacks columns {missing} (expected DETECTION_SCHEMA)")


def _col(table: pa.Table, name: str, dtype: type) -> np.ndarray:
    col = table.column(name)
    arr = col.chunk(0).to_numpy() if col.num_chunks == 1 else col.to_numpy()
    return arr.astype(dtype, copy=False)


class _BackgroundWriter:
    """A binary file whose ``write`` hands the data to a thread: the next block is built while the
    previous one is written (``write`` releases the GIL). Data must not be changed once written."""

    def __init__(self, path: str | Path, *, depth: int = 4) -> None:
        self._file = open(path, "wb")
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="kfold-ray-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (data := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self._file.write(data)
                except BaseException as e:  # reported by the next write() or close()
                    self._error = e

    def write(self, data: Any) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put(data)

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self._file.close()
        if self._error is not None:
            raise self._error

    def __enter__(self) -> _BackgroundWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        try:
            self.close()
        except BaseException:
            if exc_type is None:  # else keep the exception already on its way
                raise


# ---- cleanlab predictions --------------------------------------------------------------------------
def _group(table: pa.Table, num_images: int, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(float32 (R, 5) [x1, y1, x2, y2, score] rows grouped by (image, class), int64 (N*C,) counts).

    Within one (image, class) rows keep their table order (score descending for a stitched table).
    """
    _check_table(table)
    img = _col(table, "image_index", np.int64)
    cls = _col(table, "class_index", np.int64)
    if img.size and (img.min() < 0 or img.max() >= num_images):
        raise ValueError(f"image_index outside [0, {num_images}) in the prediction table")
    if cls.size and (cls.min() < 0 or cls.max() >= num_classes):
        raise ValueError(f"class_index outside [0, {num_classes}) in the prediction table")
    key = img * num_classes + cls
    order = np.argsort(key, kind="stable")
    data = np.empty((key.size, 5), dtype=np.float32)
    for j, name in enumerate(("x1", "y1", "x2", "y2", "score")):
        data[:, j] = _col(table, name, np.float32)[order]
    counts = np.bincount(key, minlength=num_images * num_classes)
    return data, counts


def cleanlab_predictions(
    table: pa.Table, *, num_images: int, num_classes: int
) -> list[list[np.ndarray]]:
    """cleanlab's object-detection ``predictions``, in memory.

    Returns a list over images (dataset order) of a list over class indices (``num_classes``
    entries) of float32 (M, 5) arrays ``[x1, y1, x2, y2, score]`` in absolute pixels, score
    descending. A class with no box is an empty float32 (0, 5) array (cleanlab #1228); all empty
    entries are one shared read-only array. Non-empty entries are views of one float32 array.

    cleanlab 2.9 guesses the format of ``predictions[i]`` from shapes: with exactly 3 classes, an
    image with 5 boxes of class 0 and as many of class 1 as of class 2 is misread as its other
    ("all_pred") format. Datasets with 3 classes can hit that.
    """
    data, counts = _group(table, num_images, num_classes)
    ends = np.cumsum(counts)
    empty = np.empty((0, 5), dtype=np.float32)
    empty.flags.writeable = False
    flat = [
        data[s:e] if s != e else empty
        for s, e in zip((ends - counts).tolist(), ends.tolist())
    ]
    c = num_classes
    return [flat[i * c : (i + 1) * c] for i in range(num_images)]


def write_cleanlab_predictions(
    path: str | Path, table: pa.Table, *, num_images: int, num_classes: int
) -> Path:
    """Write `cleanlab_predictions` as a pickle (protocol 5) that ``pickle.load`` reads back."""
    data, counts = _group(table, num_images, num_classes)
    with atomic_path(path) as tmp, _BackgroundWriter(tmp) as f:
        dump_nested_slices(f, data, counts, num_images, num_classes)
    return Path(path)


# ---- COCO results json ------------------------------------------------------------------------------
def write_coco_results(path: str | Path, table: pa.Table) -> Path:
    """COCO results ``[{"image_id", "category_id", "bbox": [x, y, w, h], "score"}]``, one per line.

    ``category_id`` is the original COCO id; boxes have 2 decimals, scores 5 (rounded half up).
    Numbers are right-aligned in fixed-width fields (JSON allows the spaces), so every row has the
    same layout and the text is assembled column-wise, without a per-row step::

        {"image_id":     139,"category_id":  62,"bbox":[   5.66, 167.09,  50.31,  95.02],"score":0.98765 },
    """
    _check_table(table)
    layout = _ResultLayout.of(table)
    with atomic_path(path) as tmp, _BackgroundWriter(tmp) as f:
        f.write(b"[\n")
        for lo in range(0, table.num_rows, _ROW_CHUNK):
            block = layout.render(table.slice(lo, _ROW_CHUNK))
            f.write(block if lo + _ROW_CHUNK < table.num_rows else block[:-2])  # last: no ",\n"
        f.write(b"\n]\n")
    return Path(path)


# A field: (column, decimals or None for an integer, 4-character words before the units digit).
_Field = tuple[str, "int | None", int]


class _ResultLayout:
    """One fixed-width row layout for a whole table: literal text, and number fields of 4-byte words.

    An integer is right-aligned in ``words`` words. A number with 2 decimals is ``words`` words of
    its digits above the units, then "d.dd"; with 5 decimals, then "d.dd" "ddd ". Leading zeros
    are spaces; a "-" goes just before the first digit (the widths leave room for it).
    """

    def __init__(self, fields: list[bytes | _Field]) -> None:
        self.fields = fields
        self.width = sum(len(f) if isinstance(f, bytes) else 4 * _field_words(f) for f in fields)
        row = b"".join(f if isinstance(f, bytes) else b" " * 4 * _field_words(f) for f in fields)
        self._template = row * _ROW_CHUNK

    @classmethod
    def of(cls, table: pa.Table) -> _ResultLayout:
        def words(columns: list[pa.ChunkedArray], decimals: int | None) -> int:
            lo = hi = 0.0
            for col in columns:
                lo_hi = pc.min_max(col)
                lo = min(lo, lo_hi["min"].as_py() or 0)
                hi = max(hi, lo_hi["max"].as_py() or 0)
            if not (np.isfinite(lo) and np.isfinite(hi)):
                raise ValueError("non-finite box or score in the prediction table: JSON cannot hold it")
            top = int(max(-lo, hi)) + 1  # + 1: rounding up
            if top >= 10**12:
                raise ValueError(f"value {max(-lo, hi):g} too large for COCO results")
            chars = len(str(top)) + (lo < 0)  # digits and sign
            if decimals is None:
                return -(-chars // 4)
            return -(-(chars - 1) // 4)  # the units digit is in the "d.dd" word

        col = table.column
        x1, y1, x2, y2 = col("x1"), col("y1"), col("x2"), col("y2")
        box = words([x1, y1, pc.subtract(x2, x1), pc.subtract(y2, y1)], 2)
        return cls([
            b'{"image_id":', ("image_id", None, words([col("image_id")], None)),
            b',"category_id":', ("category_id", None, words([col("category_id")], None)),
            b',"bbox":[', ("x", 2, box), b",", ("y", 2, box), b",", ("w", 2, box), b",", ("h", 2, box),
            b'],"score":', ("score", 5, words([col("score")], 5)),
            b"},\n",
        ])

    def render(self, part: pa.Table) -> np.ndarray:
        """uint8 (n * width,): the rows of ``part``, each ending with ",\\n"."""
        n, width = part.num_rows, self.width
        out = np.frombuffer(bytearray(self._template[: n * width]), dtype=np.uint8)
        x1, y1 = _col(part, "x1", np.float64), _col(part, "y1", np.float64)
        values = {"x": x1, "y": y1, "w": _col(part, "x2", np.float64) - x1,
                  "h": _col(part, "y2", np.float64) - y1}
        at = 0
        for field in self.fields:
            if isinstance(field, bytes):
                at += len(field)
                continue
            name, decimals, words = field
            v = values.get(name)
            if v is None:
                v = _col(part, name, np.float64 if decimals else np.int64)
            text, negative = _number_words(v, decimals, words)
            for j, w in enumerate(text):  # one strided 4-byte store per word column
                np.ndarray((n,), dtype=np.uint32, buffer=out, offset=at + 4 * j, strides=(width,))[:] = w
            if negative.size:  # rare: put "-" before the first digit
                cells = out.reshape(n, width)[negative, at : at + 4 * len(text)]
                first = np.argmax(cells != ord(" "), axis=1)
                out.reshape(n, width)[negative, at + first - 1] = ord("-")
            at += 4 * len(text)
        return out


def _field_words(field: _Field) -> int:
    _, decimals, words = field
    return words + {None: 0, 2: 1, 5: 2}[decimals]


def _number_words(
    v: np.ndarray, decimals: int | None, words: int
) -> tuple[list[np.ndarray], np.ndarray]:
    """(uint32 (n,) per 4-character word of ``|v|``'s text (see `_ResultLayout`), indices of the
    values that print with a "-")."""
    a = np.abs(v)
    dtype = np.int32 if a.max(initial=0) * 10 ** (decimals or 0) < 2**31 - 1 else np.int64
    if decimals is None:
        return _group_words(a.astype(dtype), words, zero="0"), np.flatnonzero(v < 0)
    q = (a * 10**decimals + 0.5).astype(dtype)  # round half up
    # q = ...hhhh u dd [ddd]: the high groups, then "u.dd" (+ "ddd ")
    out = _group_words(q // 10 ** (decimals + 1), words, zero=None)
    out.append(_UNIT_DOT_DD[q // 10 ** (decimals - 2) % 1000])
    if decimals == 5:
        out.append(_DDD_SPACE[q % 1000])
    return out, np.flatnonzero((v < 0) & (q != 0))  # no "-0.00"


def _group_words(a: np.ndarray, groups: int, *, zero: str | None) -> list[np.ndarray]:
    """Words of non-negative ``a`` in ``groups`` groups of 4 digits, right-aligned, leading zeros as
    spaces; ``a == 0`` is "   0" if ``zero`` else blank (a fraction's units digit follows)."""
    out = []
    for g in range(groups):
        below = 10 ** (4 * (groups - 1 - g))  # place value of this group's last digit
        chunk = a // below % 10000
        started = np.where(a < below * 10000, _SPACED4[chunk], _DIGITS4[chunk])
        if g == groups - 1 and zero is not None:
            out.append(started)  # "   0" for 0
        else:  # blank while the number has not started
            out.append(np.where(a < below, _BLANK4, started))
    return out


def _words(texts: list[str]) -> np.ndarray:
    """uint32 (len(texts),): each 4-character text as one word (bytes in text order)."""
    return np.frombuffer("".join(texts).encode("ascii"), dtype=np.uint32).copy()


_DIGITS4 = _words([f"{v:04d}" for v in range(10000)])
_SPACED4 = _words([f"{v:4d}" for v in range(10000)])
_BLANK4 = _words(["    "])[0]
_UNIT_DOT_DD = _words([f"{v // 100}.{v % 100:02d}" for v in range(1000)])
_DDD_SPACE = _words([f"{v:03d} " for v in range(1000)])
