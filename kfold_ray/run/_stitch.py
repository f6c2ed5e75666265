"""Stitching: the persisted parts of every fold into one table in dataset order, refused unless
each image was predicted exactly once, by the one fold that held it out."""

from __future__ import annotations

from typing import Mapping

import numpy as np
import pyarrow as pa

from .._exceptions import StitchError
from .._schema import DETECTION_SCHEMA

__all__ = ["SHOWN", "shown_indices", "stitch"]

SHOWN = 10  # image indices named in a StitchError message, per kind of problem


# ---- stitching --------------------------------------------------------------------------------
def stitch(
    folds: Mapping[int, tuple[pa.Table, np.ndarray]],
    fold_of_image: np.ndarray,
    num_images: int,
) -> pa.Table:
    """Check that the folds' outputs partition the dataset, and return them in dataset order.

    Args:
        folds: fold -> (detections table with DETECTION_SCHEMA columns, int (B,) image indices the
            fold covered, duplicates included) as returned by `FoldPartStore.read_fold`.
        fold_of_image: int (num_images,) the fold that holds out each image.
        num_images: the dataset's number of images.

    Returns:
        All detections, sorted by image_index (ascending) then score (descending); rows of equal
        score keep the order the fold produced them in. No schema metadata.

    Raises:
        StitchError: an image is missing, covered more than once, covered by a fold other than the
            one that held it out, or a detection row disagrees with the fold or image it came with.
            The message names up to 10 image indices of each kind and their counts.
    """
    fold_of_image = np.asarray(fold_of_image)
    if fold_of_image.shape != (num_images,) or not np.issubdtype(fold_of_image.dtype, np.integer):
        raise ValueError(
            f"fold_of_image must be an int array of shape ({num_images},), "
            f"got {fold_of_image.dtype} {fold_of_image.shape}"
        )
    order = sorted(int(f) for f in folds)
    _check_partition({f: np.asarray(folds[f][1]) for f in order}, fold_of_image, num_images)
    tables = [folds[f][0].replace_schema_metadata(None) for f in order]
    for f, table in zip(order, tables):
        if table.num_rows and not table.schema.equals(DETECTION_SCHEMA, check_metadata=False):
            raise StitchError(f"fold {f}: detections have columns {table.schema.names}")
    if not any(t.num_rows for t in tables):
        return DETECTION_SCHEMA.empty_table()
    return _checked_sorted_table(
        pa.concat_tables([t for t in tables if t.num_rows]),
        [(f, t.num_rows) for f, t in zip(order, tables) if t.num_rows],
        fold_of_image,
    )


def _check_partition(images: Mapping[int, np.ndarray], fold_of_image: np.ndarray, n: int) -> None:
    covered = np.concatenate([np.empty(0, np.int64)] + [i.astype(np.int64) for i in images.values()])
    by_fold = np.concatenate(
        [np.empty(0, np.int64)] + [np.full(len(i), f, np.int64) for f, i in images.items()]
    )
    problems: list[str] = []
    outside = (covered < 0) | (covered >= n)
    if outside.any():
        bad = np.unique(covered[outside])
        problems.append(f"{bad.size} image indices outside [0, {n}): {shown_indices(bad)}")
        covered, by_fold = covered[~outside], by_fold[~outside]
    counts = np.bincount(covered, minlength=n)
    missing = np.flatnonzero(counts == 0)
    duplicated = np.flatnonzero(counts > 1)
    wrong = by_fold != fold_of_image[covered]
    wrong_images = np.unique(covered[wrong])
    if missing.size:
        problems.append(f"{missing.size} images missing: {shown_indices(missing)}")
    if duplicated.size:
        problems.append(f"{duplicated.size} images predicted more than once: {shown_indices(duplicated)}")
    if wrong_images.size:
        first = np.flatnonzero(wrong)[:SHOWN]
        pairs = ", ".join(
            f"image {covered[j]} by fold {by_fold[j]} (held out by fold {fold_of_image[covered[j]]})"
            for j in first
        )
        problems.append(
            f"{wrong_images.size} images predicted by a fold that trained on them: {pairs}"
            + (" ..." if wrong.sum() > SHOWN else "")
        )
    if problems:
        raise StitchError(
            "fold predictions are not a partition of the dataset: " + "; ".join(problems),
            missing=missing[:SHOWN].tolist(),
            duplicated=duplicated[:SHOWN].tolist(),
            wrong_fold=wrong_images[:SHOWN].tolist(),
        )


def _checked_sorted_table(
    table: pa.Table, part_rows: list[tuple[int, int]], fold_of_image: np.ndarray
) -> pa.Table:
    """Check every detection row, and sort rows by image_index then score descending (stable).

    ``part_rows`` is (fold, number of rows) of the folds' tables concatenated in ``table``. Each
    column is copied out of the (memory-mapped) parts once, into one reused buffer, then gathered
    in sorted order: peak memory is about the sorted table plus two columns.
    """
    scratch = np.empty(table.num_rows * 8, dtype=np.uint8)
    img = _np(table, "image_index")
    outside = (img < 0) | (img >= fold_of_image.shape[0])
    if outside.any():
        raise StitchError(
            f"detections for image indices outside the dataset: {shown_indices(np.unique(img[outside]))}"
        )
    lo = 0
    for fold, rows in part_rows:
        part = img[lo : lo + rows]
        bad = fold_of_image[part] != fold
        if bad.any():
            raise StitchError(
                f"fold {fold}: {int(bad.sum())} detections for images it did not hold out: "
                f"images {shown_indices(np.unique(part[bad]))}",
                wrong_fold=np.unique(part[bad])[:SHOWN].tolist(),
            )
        lo += rows
    # One uint64 key (image in the high half, descending score in the low half) sorts in one
    # stable pass, 6x faster than np.lexsort on two keys; "+ 0.0" folds -0.0 into 0.0.
    bits = (_np(table, "score", scratch) + np.float32(0.0)).view(np.uint32)
    ascending = np.where(bits >> 31 == 1, ~bits, bits | np.uint32(0x80000000))
    key = (img.astype(np.uint64) << np.uint64(32)) | (~ascending).astype(np.uint64)
    del bits, ascending
    order = np.argsort(key, kind="stable")
    del key
    img = img[order]
    columns, finite = [], np.ones(img.size, dtype=bool)
    for name in DETECTION_SCHEMA.names:
        col = img if name == "image_index" else _np(table, name, scratch)[order]
        if name == "fold" and (col != fold_of_image[img]).any():
            wrong = np.unique(img[col != fold_of_image[img]])
            raise StitchError(
                f"{wrong.size} images have detections whose fold column is not the fold that held "
                f"them out: {shown_indices(wrong)}",
                wrong_fold=wrong[:SHOWN].tolist(),
            )
        if DETECTION_SCHEMA.field(name).type == pa.float32():
            finite &= np.isfinite(col)
        columns.append(pa.array(col))
    if not finite.all():
        bad = np.unique(img[~finite])
        raise StitchError(f"non-finite box or score in detections of images {shown_indices(bad)}")
    return pa.Table.from_arrays(columns, schema=DETECTION_SCHEMA)


def _np(table: pa.Table, name: str, scratch: np.ndarray | None = None) -> np.ndarray:
    """A column as one numpy array: zero-copy for one chunk, else concatenated (into ``scratch``,
    a uint8 buffer large enough, when given: its contents are replaced on the next call)."""
    col = table.column(name)
    if col.num_chunks == 1:
        return col.chunk(0).to_numpy(zero_copy_only=False)
    dtype = col.type.to_pandas_dtype()
    if scratch is None or col.null_count:
        return col.to_numpy()
    out = scratch[: len(col) * np.dtype(dtype).itemsize].view(dtype)
    np.concatenate([c.to_numpy() for c in col.chunks if len(c)], out=out)
    return out


def shown_indices(indices: np.ndarray) -> str:
    shown = ", ".join(str(int(i)) for i in indices[:SHOWN])
    return f"[{shown}{', ...' if len(indices) > SHOWN else ''}]"


