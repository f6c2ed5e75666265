"""Per box, what the fold model that never trained on the image says: one signal per kind of
label error, for every given box and every prediction of the run (from the flat pass over their
pairs, `kfold_ray.report._scores`). Higher = more likely wrong.

Given boxes, from the fold model's heads on the given box itself (box_losses.parquet; where a
column is missing, an older run, from the predictions covering the box instead):

    swapped        (1 - p_given - p_background) - p_given: the other classes against the given
                   one (predictions: best other-class cover - best same-class cover)
    badly_located  1 - refined_iou: the box against where the model would move it (predictions:
                   1 - IoU with its best box, the prediction of largest IoU x score overlapping it)
    spurious       p_background: the model sees no object in the box (predictions: 1 - the
                   best score of a prediction covering it at IoU >= 0.5)

Predictions:

    overlooked     the score of a prediction that no given box claims as its best box and that
                   overlaps no given box with IoU >= `UNMATCHED_IOU` (an object nobody labelled);
                   a shifted box claims the prediction of its true object, so that prediction is
                   not reported as overlooked as well

The choices were made on the digits benchmark at one seed (benchmarks/README.md, "Label errors
per kind"), among the candidates it lists.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ._pairs import FlatBoxes
from ._scores import PairStats

if TYPE_CHECKING:
    import pyarrow as pa

    from ..data._dataset import CocoDataset

__all__ = ["BoxSignals", "UNMATCHED_IOU", "box_signals", "given_box_terms"]

UNMATCHED_IOU = 0.5
#: The per-given-box columns of box_losses.parquet the signals read (older runs lack the last three).
TERMS = ("loss_cls", "loss_box_reg", "p_given", "p_background", "p_other", "other_class", "refined_iou")


@dataclass
class BoxSignals:
    """Flat per-box arrays of a dataset's kept (non-crowd) given boxes, in cleanlab's label order
    (image by image), and of its predictions, grouped by image then class (cleanlab's order).

    Given (G,): ``g_image`` int64, ``g_row`` int64 (row in the dataset's annotation arrays),
    ``g_class`` int64, ``g_box`` float64 (G, 4), ``claim`` int64 (index of its best prediction,
    -1: none overlaps it), ``claim_iou`` float64, ``swapped``, ``badly_located``, ``spurious``
    float64 (NaN: not computable), ``swap_evidence`` bool (another class beats the given one),
    ``suggested_class`` int64 (-1: none).
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
    swap_evidence: np.ndarray
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


def box_signals(flat: FlatBoxes, stats: PairStats, terms: dict[str, np.ndarray]) -> BoxSignals:
    """Every per-box signal of the run (see the module docstring), from the flat boxes and the
    pass over their pairs (`kfold_ray.report._scores.pair_stats`); ``terms``: `given_box_terms`
    ({} without box losses)."""
    claimed = np.zeros(flat.p_image.size, dtype=bool)
    claimed[stats.claim[stats.claim >= 0]] = True
    unmatched = ~claimed & (stats.best_iou < UNMATCHED_IOU)
    missing = tuple(t for t in TERMS if t not in terms)
    swapped, swap_evidence, suggested, spurious = _class_signals(terms, stats, flat.g_image.size)
    refined = terms.get("refined_iou")
    from_claim = np.where(stats.claim >= 0, 1.0 - stats.claim_iou, np.nan)
    badly_located = from_claim if refined is None else np.where(np.isnan(refined), from_claim,
                                                                1.0 - refined)
    return BoxSignals(
        g_image=flat.g_image, g_row=flat.g_row, g_class=flat.g_class, g_box=flat.g_box,
        claim=stats.claim, claim_iou=stats.claim_iou, swapped=swapped, swap_evidence=swap_evidence,
        badly_located=badly_located, spurious=spurious, suggested_class=suggested,
        p_image=flat.p_image, p_class=flat.p_class, p_box=flat.p_box, p_score=flat.p_score,
        p_table_row=flat.p_table_row, best_iou=stats.best_iou, unmatched=unmatched,
        overlooked=np.where(unmatched, flat.p_score, np.nan), terms=terms, missing=missing)


def _class_signals(terms: dict[str, np.ndarray], pairs: PairStats, n: int):
    """(swapped, swap evidence, suggested class, spurious) per given box: from the model's heads
    on the box where the run has them, else from the predictions covering it (IoU >=
    `UNMATCHED_IOU`).

    swapped is the other classes' probability together against the given class's,
    ``(1 - p_given - p_background) - p_given``: chosen on the digits benchmark (seed 0, the
    example's budget; benchmarks/README.md) over the best other class alone (``p_other -
    p_given``), which a briefly trained model spreads over several classes. The evidence of a
    swap is the best other class beating the given one (``p_other > p_given``)."""
    cover_same, cover_other = pairs.cover_same, pairs.cover_other
    swapped = cover_other - cover_same
    evidence = cover_other > cover_same
    suggested = np.where(cover_other > 0, pairs.cover_other_class, -1)
    spurious = 1.0 - np.maximum(cover_same, cover_other)
    if "p_given" in terms and "p_background" in terms:
        p_given, p_background = terms["p_given"], terms["p_background"]
        head = ~np.isnan(p_given) & ~np.isnan(p_background)
        swapped = np.where(head, (1.0 - p_background - p_given) - p_given, swapped)
        if "p_other" in terms:
            p_other, other_class = terms["p_other"], terms["other_class"]
            known = head & ~np.isnan(p_other)
            evidence = np.where(known, p_other > p_given, evidence)
            suggested = np.where(known, np.nan_to_num(other_class, nan=-1), suggested)
        spurious = np.where(np.isnan(p_background), spurious, p_background)
    return swapped, evidence, suggested.astype(np.int64), spurious
