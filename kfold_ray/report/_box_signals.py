"""Per box, what the fold model that never trained on the image says: one signal per kind of
label error, computed for every given box and every prediction of the run, in numpy, a chunk of
images at a time (bounded memory at COCO scale).

Given boxes (from box_losses.parquet, the model's heads run on the given box itself; where a
column is missing, from the predictions instead, see `SIGNALS`):

    swapped        p_other - p_given: the best other class against the given one
    badly_located  1 - IoU of the given box with the model's best box for it (the
                   prediction that overlaps it most, by IoU x score, of any class)
    spurious       p_background: the model sees no object in the box

Predictions:

    overlooked     the score of a prediction that no given box claims as its best box and that
                   overlaps no given box with IoU >= `UNMATCHED_IOU` (an object nobody labelled)

A shifted box claims the prediction of its true object, so that prediction is not reported as
overlooked as well.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import pyarrow as pa

    from ..data._dataset import CocoDataset

__all__ = ["BoxSignals", "UNMATCHED_IOU", "box_signals", "given_box_terms"]

UNMATCHED_IOU = 0.5
#: Pairs (given box x prediction of the same image) handled at once: ~200 MB of temporaries.
_CHUNK_PAIRS = 4_000_000
#: The per-given-box columns of box_losses.parquet the signals read (older runs lack the last three).
TERMS = ("loss_cls", "loss_box_reg", "p_given", "p_background", "p_other", "other_class", "refined_iou")


@dataclass
class BoxSignals:
    """Flat per-box arrays of a dataset's kept (non-crowd) given boxes, in cleanlab's label order
    (image by image), and of its predictions, grouped by image then class (cleanlab's order).

    Given (G,): ``g_image`` int64, ``g_row`` int64 (row in the dataset's annotation arrays),
    ``g_class`` int64, ``g_box`` float32 (G, 4), ``claim`` int64 (index of its best prediction,
    -1: none overlaps it), ``claim_iou`` float64, ``swapped``, ``badly_located``, ``spurious``
    float64 (NaN: not computable), ``suggested_class`` int64 (-1: none).
    Predictions (P,): ``p_image``, ``p_class``, ``p_box``, ``p_score``, ``p_table_row`` (its row
    in the prediction table), ``best_iou`` (with any given box), ``unmatched`` bool,
    ``overlooked`` float64 (NaN for a matched prediction).
    ``missing``: names of the box_losses columns absent from the run (their signals came from
    the predictions).
    """

    g_image: np.ndarray
    g_row: np.ndarray
    g_class: np.ndarray
    g_box: np.ndarray
    claim: np.ndarray
    claim_iou: np.ndarray
    swapped: np.ndarray
    badly_located: np.ndarray
    spurious: np.ndarray
    suggested_class: np.ndarray
    p_image: np.ndarray
    p_class: np.ndarray
    p_box: np.ndarray
    p_score: np.ndarray
    p_table_row: np.ndarray
    best_iou: np.ndarray
    unmatched: np.ndarray
    overlooked: np.ndarray
    terms: dict[str, np.ndarray]
    missing: tuple[str, ...]


def given_box_terms(dataset: CocoDataset, box_losses: pa.Table | None) -> dict[str, np.ndarray]:
    """The `TERMS` of every kept given box, float64 (G,) in cleanlab's label order; NaN for a box
    without a row or a column the run lacks (absent keys: no box_losses at all)."""
    if box_losses is None:
        return {}
    keep = ~np.asarray(dataset.iscrowd, dtype=bool)
    kept_before = np.concatenate([[0], np.cumsum(keep)])
    if "ann_row" in box_losses.column_names:
        rows = box_losses.column("ann_row").to_numpy().astype(np.int64)
        found = np.ones(rows.size, dtype=bool)
    else:  # box_losses.parquet names the annotation by id; ids the dataset lacks are left out
        sorter = np.argsort(dataset.ann_ids, kind="stable")
        ids = box_losses.column("annotation_id").to_numpy().astype(np.int64)
        at = np.searchsorted(dataset.ann_ids, ids, sorter=sorter)
        found = at < len(sorter)
        found[found] = dataset.ann_ids[sorter[at[found]]] == ids[found]
        rows = np.where(found, sorter[np.minimum(at, len(sorter) - 1)], 0)
    ok = found & keep[rows]
    out = {}
    for name in TERMS:
        if name not in box_losses.column_names:
            continue
        column = np.full(int(keep.sum()), np.nan)
        values = box_losses.column(name).to_numpy(zero_copy_only=False)
        column[kept_before[rows[ok]]] = np.asarray(values, dtype=np.float64)[ok]
        out[name] = column
    return out


def box_signals(dataset: CocoDataset, predictions: pa.Table, terms: dict[str, np.ndarray],
                scores: np.ndarray | None = None) -> BoxSignals:
    """Every per-box signal of the run (see the module docstring).

    Args:
        dataset: the labels (crowd boxes left out).
        predictions: DETECTION_SCHEMA columns (image_index, class_index, x1..y2, score).
        terms: `given_box_terms` of the run ({} without box losses).
        scores: float (rows of ``predictions``,) scores to use instead of the table's (e.g.
            calibrated), in table order.
    """
    keep = ~np.asarray(dataset.iscrowd, dtype=bool)
    g_row = np.flatnonzero(keep)
    per_image = np.diff(dataset.ann_offsets)
    g_image = np.repeat(np.arange(dataset.num_images, dtype=np.int64), per_image)[g_row]
    g_box = np.asarray(dataset.boxes, dtype=np.float32)[g_row]
    g_class = np.asarray(dataset.classes, dtype=np.int64)[g_row]
    col = lambda name, dtype: predictions.column(name).to_numpy().astype(dtype, copy=False)  # noqa: E731
    img, cls = col("image_index", np.int64), col("class_index", np.int64)
    order = np.argsort(img * max(dataset.num_classes, 1) + cls, kind="stable")
    p_image, p_class = img[order], cls[order]
    p_box = np.stack([col(c, np.float32)[order] for c in ("x1", "y1", "x2", "y2")], axis=1) \
        if order.size else np.zeros((0, 4), np.float32)
    p_score = (col("score", np.float64) if scores is None else np.asarray(scores, np.float64))[order]
    pairs = _pair_pass(dataset.num_images, g_image, g_box, g_class, p_image, p_box, p_class, p_score)
    claimed = np.zeros(p_image.size, dtype=bool)
    claimed[pairs["claim"][pairs["claim"] >= 0]] = True
    unmatched = ~claimed & (pairs["best_iou"] < UNMATCHED_IOU)
    missing = tuple(t for t in TERMS if t not in terms)
    swapped, suggested, spurious = _class_signals(terms, pairs, g_class.size)
    refined = terms.get("refined_iou")
    from_claim = np.where(pairs["claim"] >= 0, 1.0 - pairs["claim_iou"], np.nan)
    badly_located = from_claim if refined is None else np.where(np.isnan(refined), from_claim,
                                                                1.0 - refined)
    return BoxSignals(
        g_image=g_image, g_row=g_row, g_class=g_class, g_box=g_box, claim=pairs["claim"],
        claim_iou=pairs["claim_iou"], swapped=swapped, badly_located=badly_located,
        spurious=spurious, suggested_class=suggested, p_image=p_image, p_class=p_class,
        p_box=p_box, p_score=p_score, p_table_row=order, best_iou=pairs["best_iou"],
        unmatched=unmatched, overlooked=np.where(unmatched, p_score, np.nan), terms=terms,
        missing=missing)


def _class_signals(terms: dict[str, np.ndarray], pairs: dict[str, np.ndarray], n: int):
    """(swapped, suggested class, spurious) per given box: from the model's heads on the box
    where the run has them, else from the predictions covering it (IoU >= `UNMATCHED_IOU`)."""
    cover_same, cover_other = pairs["cover_same"], pairs["cover_other"]
    swapped = cover_other - cover_same
    suggested = np.where(cover_other > 0, pairs["cover_other_class"], -1)
    spurious = 1.0 - np.maximum(cover_same, cover_other)
    if "p_given" in terms:
        p_given = terms["p_given"]
        if "p_other" in terms:
            p_other = terms["p_other"]
            head_class = terms["other_class"]
        else:  # older runs: all other classes' probability together (>= the best other one)
            p_other = 1.0 - p_given - terms["p_background"]
            head_class = np.full(n, np.nan)
        head = ~np.isnan(p_given) & ~np.isnan(p_other)
        swapped = np.where(head, p_other - p_given, swapped)
        suggested = np.where(head & ~np.isnan(head_class), np.nan_to_num(head_class, nan=-1),
                             suggested).astype(np.int64)
    if "p_background" in terms:
        bg = terms["p_background"]
        spurious = np.where(np.isnan(bg), spurious, bg)
    return swapped, suggested.astype(np.int64), spurious


def _pair_pass(num_images: int, g_image, g_box, g_class, p_image, p_box, p_class, p_score
               ) -> dict[str, np.ndarray]:
    """Every (given box, prediction) pair of each image, a chunk of images at a time.

    Per given box: ``claim`` (its best box: the prediction of largest IoU x score among those
    overlapping it; -1: none), ``claim_iou``, ``cover_same``/``cover_other`` (best score of a
    prediction of its class / another class with IoU >= `UNMATCHED_IOU`; 0: none) and
    ``cover_other_class``. Per prediction: ``best_iou`` with any given box (0: none).
    """
    G, P = g_image.size, p_image.size
    out = {"claim": np.full(G, -1, np.int64), "claim_iou": np.zeros(G), "cover_same": np.zeros(G),
           "cover_other": np.zeros(G), "cover_other_class": np.full(G, -1, np.int64),
           "best_iou": np.zeros(P)}
    g_start = np.searchsorted(g_image, np.arange(num_images + 1))
    p_start = np.searchsorted(p_image, np.arange(num_images + 1))
    n_g, n_p = np.diff(g_start), np.diff(p_start)
    cost = np.cumsum(n_g * n_p)
    lo = 0
    while lo < num_images:
        base = cost[lo - 1] if lo else 0
        hi = max(lo + 1, int(np.searchsorted(cost, base + _CHUNK_PAIRS, side="right")))
        hi = min(hi, num_images)
        _pairs_of(out, slice(lo, hi), g_start, p_start, n_g, n_p, g_box, g_class, p_box, p_class,
                  p_score)
        lo = hi
    return out


def _pairs_of(out, images: slice, g_start, p_start, n_g, n_p, g_box, g_class, p_box, p_class,
              p_score) -> None:
    ng, npred = n_g[images], n_p[images]
    per = ng * npred
    if not per.sum():
        return
    # Pair k of image i: given g_start[i] + k // npred[i], prediction p_start[i] + k % npred[i].
    owner = np.repeat(np.arange(per.size), per)
    k = np.arange(per.sum()) - np.repeat(np.cumsum(per) - per, per)
    g = g_start[images][owner] + k // npred[owner]
    p = p_start[images][owner] + k % npred[owner]
    iou = _iou(g_box[g], p_box[p])
    # Per given box: pairs are contiguous (given-major), so reduceat over its segment.
    seg = np.flatnonzero(np.r_[True, g[1:] != g[:-1]])
    gs = g[seg]
    weight = iou * p_score[p]
    best = np.maximum.reduceat(weight, seg)
    # The first pair of each segment reaching its best weight is the claim.
    is_best = (weight == np.repeat(best, np.diff(np.r_[seg, g.size]))) & (weight > 0)
    first = np.flatnonzero(is_best)
    first = first[np.r_[True, g[first][1:] != g[first][:-1]]] if first.size else first
    out["claim"][g[first]] = p[first]
    out["claim_iou"][g[first]] = iou[first]
    covers = iou >= UNMATCHED_IOU
    same = g_class[g] == p_class[p]
    s = np.where(covers & same, p_score[p], 0.0)
    o = np.where(covers & ~same, p_score[p], 0.0)
    out["cover_same"][gs] = np.maximum.reduceat(s, seg)
    out["cover_other"][gs] = np.maximum.reduceat(o, seg)
    top = np.flatnonzero(o > 0)
    if top.size:  # class of the best other-class cover: the last write of a sort by score wins
        top = top[np.argsort(o[top], kind="stable")]
        out["cover_other_class"][g[top]] = p_class[p[top]]
    np.maximum.at(out["best_iou"], p, iou)


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """float64 (n,) IoU of the xyxy boxes a[i] and b[i]."""
    a, b = a.astype(np.float64, copy=False), b.astype(np.float64, copy=False)
    w = np.clip(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0, None)
    h = np.clip(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0, None)
    inter = w * h
    union = ((a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1]) + (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
             - inter)
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)
