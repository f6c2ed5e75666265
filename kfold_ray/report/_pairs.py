"""Flat boxes and their pairs: every (given box, prediction) pair of each image, a chunk of
images at a time, so that the ranking works in numpy over the whole dataset with bounded memory
(118,287 COCO images x 100 detections are ~86M pairs; `MAX_PAIRS` of them at once).

Given boxes are the dataset's kept (non-crowd) boxes in cleanlab's label order (image by image,
json order); predictions are grouped by image then class, table order within (cleanlab's
flattening of its ``predictions``: score descending within a class for a stitched table).
Within a chunk, pairs run given-major: the pairs of one given box are contiguous (``seg``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import numpy as np

if TYPE_CHECKING:
    import pyarrow as pa

    from ..data._dataset import CocoDataset

__all__ = ["FlatBoxes", "GivenPairs", "PairChunk", "flatten", "given_pairs", "pair_chunks",
           "pair_iou"]

#: Pairs handled at once (each float64 temporary is 8 bytes x this).
MAX_PAIRS = 2_000_000


@dataclass
class FlatBoxes:
    """Given boxes (G,) and predictions (P,) of a dataset, flat (see the module docstring).

    ``g_image`` int64, ``g_row`` int64 (row in the dataset's annotation arrays), ``g_class``
    int64, ``g_box`` float64 (G, 4) xyxy; ``p_image``, ``p_class`` int64, ``p_box`` float64
    (P, 4), ``p_score`` float64, ``p_table_row`` int64 (row in the prediction table);
    ``g_start``/``p_start`` int64 (N + 1,) where each image's boxes start.
    """

    num_images: int
    g_image: np.ndarray
    g_row: np.ndarray
    g_class: np.ndarray
    g_box: np.ndarray
    p_image: np.ndarray
    p_class: np.ndarray
    p_box: np.ndarray
    p_score: np.ndarray
    p_table_row: np.ndarray
    g_start: np.ndarray
    p_start: np.ndarray


def flatten(dataset: CocoDataset, predictions: pa.Table) -> FlatBoxes:
    keep = ~np.asarray(dataset.iscrowd, dtype=bool)
    g_row = np.flatnonzero(keep)
    per_image = np.diff(dataset.ann_offsets)
    n = dataset.num_images
    g_image = np.repeat(np.arange(n, dtype=np.int64), per_image)[g_row]
    col = lambda name, dtype: predictions.column(name).to_numpy().astype(dtype, copy=False)  # noqa: E731
    img, cls = col("image_index", np.int64), col("class_index", np.int64)
    if img.size and (img.min() < 0 or img.max() >= n):
        raise ValueError(f"image_index outside [0, {n}) in the prediction table")
    if cls.size and (cls.min() < 0 or cls.max() >= dataset.num_classes):
        raise ValueError(f"class_index outside [0, {dataset.num_classes}) in the prediction table")
    order = np.argsort(img * max(dataset.num_classes, 1) + cls, kind="stable")
    p_image = img[order]
    # float32, as cleanlab reads them from its predictions (exact in float64 when a chunk needs it)
    p_box = np.empty((order.size, 4), dtype=np.float32)
    for j, c in enumerate(("x1", "y1", "x2", "y2")):
        p_box[:, j] = col(c, np.float32)[order]
    p_score = col("score", np.float32)[order].astype(np.float64)
    small = np.int32 if max(order.size, dataset.num_classes) < 2**31 else np.int64
    return FlatBoxes(
        num_images=n, g_image=g_image, g_row=g_row,
        g_class=np.asarray(dataset.classes, dtype=np.int64)[g_row],
        g_box=np.asarray(dataset.boxes, dtype=np.float32)[g_row].astype(np.float64),
        p_image=p_image, p_class=cls[order].astype(small), p_box=p_box, p_score=p_score,
        p_table_row=order.astype(small),
        g_start=np.searchsorted(g_image, np.arange(n + 1)),
        p_start=np.searchsorted(p_image, np.arange(n + 1)))


@dataclass
class PairChunk:
    """The pairs of images [lo, hi): given ``g`` and prediction ``p`` (global indices), their
    boxes (float64 (n, 4)) and ``iou``; ``seg`` the position where each given box's pairs
    start, ``seg_g`` that box."""

    g: np.ndarray
    p: np.ndarray
    g_box: np.ndarray
    p_box: np.ndarray
    iou: np.ndarray
    seg: np.ndarray
    seg_g: np.ndarray

    def per_given_max(self, values: np.ndarray) -> np.ndarray:
        """Max of ``values`` (one per pair) over each given box's pairs, for ``seg_g``."""
        return np.maximum.reduceat(values, self.seg) if self.seg.size else values[:0]


def pair_chunks(flat: FlatBoxes, max_pairs: int = MAX_PAIRS) -> Iterator[PairChunk]:
    """Every (given, prediction) pair of each image, in chunks of whole images."""
    n_g, n_p = np.diff(flat.g_start), np.diff(flat.p_start)
    per_given = n_p[flat.g_image]  # pairs of each given box: its image's predictions
    for lo, hi in _chunks(n_g * n_p, max_pairs):
        g0, g1 = int(flat.g_start[lo]), int(flat.g_start[hi])
        counts = per_given[g0:g1]
        total = int(counts.sum())
        if not total:
            continue
        seg = np.cumsum(counts) - counts  # where each given box's pairs start
        has = counts > 0
        seg_g = np.arange(g0, g1)[has]
        g = np.repeat(np.arange(g0, g1), counts)
        # A given box's pairs are its image's predictions in order: p = first + position.
        p = np.arange(total, dtype=np.int64) + np.repeat(flat.p_start[flat.g_image[g0:g1]] - seg, counts)
        g_box = np.repeat(flat.g_box[g0:g1], counts, axis=0)
        p_box = flat.p_box[p].astype(np.float64)
        yield PairChunk(g=g, p=p, g_box=g_box, p_box=p_box, iou=pair_iou(g_box, p_box),
                        seg=seg[has], seg_g=seg_g)


@dataclass
class GivenPairs:
    """Pairs of distinct given boxes of the same image: ``a``, ``b`` (global indices), ``iou``."""

    a: np.ndarray
    b: np.ndarray
    iou: np.ndarray


def given_pairs(flat: FlatBoxes, max_pairs: int = MAX_PAIRS) -> Iterator[GivenPairs]:
    n_g = np.diff(flat.g_start)
    for lo, hi in _chunks(n_g * n_g, max_pairs):
        ng = n_g[lo:hi]
        per = ng * ng
        total = int(per.sum())
        if not total:
            continue
        owner = np.repeat(np.arange(per.size), per)
        k = np.arange(total) - np.repeat(np.cumsum(per) - per, per)
        a = flat.g_start[lo:hi][owner] + k // ng[owner]
        b = flat.g_start[lo:hi][owner] + k % ng[owner]
        distinct = a != b
        a, b = a[distinct], b[distinct]
        yield GivenPairs(a=a, b=b, iou=pair_iou(flat.g_box[a], flat.g_box[b]))


def _chunks(cost: np.ndarray, max_pairs: int) -> Iterator[tuple[int, int]]:
    """[lo, hi) ranges of images whose pair counts add up to about ``max_pairs`` (one image at
    least)."""
    total = np.cumsum(cost)
    n, lo = cost.size, 0
    while lo < n:
        base = total[lo - 1] if lo else 0
        hi = min(n, max(lo + 1, int(np.searchsorted(total, base + max_pairs, side="right"))))
        yield lo, hi
        lo = hi


def pair_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """float64 (n,) IoU of the xyxy boxes a[i] and b[i], as cleanlab's ``rank._get_iou``
    computes it (the union clipped at its EPSILON)."""
    from cleanlab.internal.constants import EPSILON

    left = np.maximum(a[:, 0], b[:, 0])
    top = np.maximum(a[:, 1], b[:, 1])
    right = np.minimum(a[:, 2], b[:, 2])
    bottom = np.minimum(a[:, 3], b[:, 3])
    apart = (right < left) | (bottom < top)
    inter = np.where(apart, 0.0, (right - left) * (bottom - top))
    union = np.clip((a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1]) + (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
                    - inter, EPSILON, None)
    return np.where(apart, 0.0, inter / union)
