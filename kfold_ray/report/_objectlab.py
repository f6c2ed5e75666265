"""cleanlab's ObjectLab scores from per-image ``auxiliary_inputs``, without its process pools.

``cleanlab.object_detection.filter.find_label_issues`` rebuilds the auxiliary inputs with a Python
loop per box pair, then computes per-class AP at 10 IoU thresholds, starting a process pool for
each threshold and shipping every image's boxes of every class to it (benchmarks/README.md,
"Ranking at COCO scale": that is what made ranking COCO train take hours).
``get_label_quality_scores`` rebuilds the auxiliary inputs once more. Its per-box
``compute_overlooked_box_scores`` and ``compute_swap_box_scores`` recompute each image's IoU
matrix in Python even when given it, box pair by box pair (~3 ms per image of 100 detections).
Here all of it comes from the auxiliary inputs built once (`auxiliary_inputs`),
per image in numpy, in one process, with cleanlab's constants, formulas and dtypes; tests check
every output against cleanlab's on random data.

One difference: where two predictions of one class have exactly the same score, cleanlab's order
among them is numpy's unstable quicksort; ours is the table's (stable). Only AP can differ then.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["auxiliary_inputs", "box_scores", "find_label_issues", "label_quality_scores", "per_class_ap",
           "per_class_ap_flat"]

IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)  # as cleanlab's _get_per_class_ap


def box_scores(aux: list[dict[str, Any]]) -> dict[str, list[np.ndarray]]:
    """cleanlab's per-box subtype scores with its default parameters: "overlooked" (per predicted
    box, NaN where it does not apply), "swapped" and "badly_located" (per given box), as
    ``compute_overlooked_box_scores`` / ``compute_swap_box_scores`` / ``compute_badloc_box_scores``
    return them for the same auxiliary inputs."""
    from cleanlab.internal.constants import (
        HIGH_PROBABILITY_THRESHOLD,
        LABEL_OVERLAP_THRESHOLD,
        LOW_PROBABILITY_THRESHOLD,
    )

    out: dict[str, list[np.ndarray]] = {"overlooked": [], "swapped": [], "badly_located": []}
    for a in aux:
        lab, pred, probs = a["lab_labels"], a["pred_labels"], a["pred_label_probs"]
        sim, iou, floor = a["similarity_matrix"], a["iou_matrix"], a["min_possible_similarity"]
        same = lab[:, None] == pred[None, :]  # (L, M)
        # overlooked: a confident prediction touching no given box; its score is its similarity
        # to the nearest given box of its class (none: the floor, scaled by its doubt).
        candidate = (probs >= HIGH_PROBABILITY_THRESHOLD) & ~(iou > 0).any(axis=0)
        nearest = np.where(same, sim, -np.inf).max(axis=0, initial=-np.inf)
        overlooked = np.where(same.any(axis=0), nearest, floor * (1 - probs))
        out["overlooked"].append(np.where(candidate, overlooked, np.nan))
        # swapped: 1 - similarity to the nearest confident prediction of another class; the floor
        # for a box that another given box of another class covers almost exactly.
        other = ~same & (probs[None, :] > HIGH_PROBABILITY_THRESHOLD)
        closest = np.where(other, sim, -np.inf).max(axis=1, initial=-np.inf)
        swap = np.where(other.any(axis=1), np.maximum(floor, 1 - closest), 1.0)
        lab_iou = _label_iou(a["lab_bboxes"])
        conflict = ((lab_iou >= LABEL_OVERLAP_THRESHOLD) & (lab[:, None] != lab[None, :])).any(axis=1)
        out["swapped"].append(np.where(conflict, floor, swap))
        # badly located: similarity to the nearest overlapping same-class prediction scoring > 0.5.
        near = same & (probs[None, :] > LOW_PROBABILITY_THRESHOLD) & (iou > 0)
        best = np.where(near, sim, -np.inf).max(axis=1, initial=-np.inf)
        out["badly_located"].append(np.where(near.any(axis=1), best, 1.0))
    return out


def _label_iou(boxes: np.ndarray) -> np.ndarray:
    """(L, L) IoU of an image's given boxes with each other, as cleanlab computes it."""
    from cleanlab.internal.constants import EPSILON

    return _iou_matrix(boxes, boxes, EPSILON)


def label_quality_scores(pooled: dict[str, np.ndarray]) -> np.ndarray:
    """cleanlab's ``get_label_quality_scores`` from the pooled subtype scores ("overlooked",
    "swapped", "badly_located"): their weighted geometric mean with cleanlab's default weights."""
    from cleanlab.internal.constants import (
        CUSTOM_SCORE_WEIGHT_BADLOC,
        CUSTOM_SCORE_WEIGHT_OVERLOOKED,
        CUSTOM_SCORE_WEIGHT_SWAP,
        TINY_VALUE,
    )

    weights = {"overlooked": CUSTOM_SCORE_WEIGHT_OVERLOOKED, "swapped": CUSTOM_SCORE_WEIGHT_SWAP,
               "badly_located": CUSTOM_SCORE_WEIGHT_BADLOC}
    log = sum(w * np.log(TINY_VALUE + np.asarray(pooled[k], dtype=np.float64))
              for k, w in weights.items())
    return np.exp(log)


def find_label_issues(aux: list[dict[str, Any]], per_box: dict[str, list[np.ndarray]],
                      num_classes: int) -> np.ndarray:
    """bool (N,): cleanlab's ``find_label_issues`` (default arguments) from the auxiliary inputs
    and the per-box scores: a box is an issue when its subtype score is <= 0.8 x a quarter of its
    class's AP (averaged over IoU 0.5:0.95); an image when any of its boxes is."""
    from cleanlab.internal.constants import (
        AP_SCALE_FACTOR,
        BADLOC_THRESHOLD_FACTOR,
        OVERLOOKED_THRESHOLD_FACTOR,
        SWAP_THRESHOLD_FACTOR,
    )

    threshold = per_class_ap(aux, num_classes) * AP_SCALE_FACTOR
    checks = (("overlooked", "pred_labels", OVERLOOKED_THRESHOLD_FACTOR),
              ("badly_located", "lab_labels", BADLOC_THRESHOLD_FACTOR),
              ("swapped", "lab_labels", SWAP_THRESHOLD_FACTOR))
    out = np.zeros(len(aux), dtype=bool)
    for kind, classes, factor in checks:
        for i, a in enumerate(aux):
            scores = np.asarray(per_box[kind][i], dtype=np.float64)
            if scores.size:  # cleanlab reads a missing score (NaN) as clean (1.0)
                scores = np.where(np.isnan(scores), 1.0, scores)
                out[i] |= bool(np.any(scores <= threshold[a[classes]] * factor))
    return out


def per_class_ap(aux: list[dict[str, Any]], num_classes: int) -> np.ndarray:
    """float64 (C,): per class, AP averaged over IoU 0.5:0.95 as cleanlab's ``_get_per_class_ap``
    computes it (VOC-style all-point interpolation over all images' predictions of the class)."""
    cls, score, best, label = _best_same_class_label(aux)
    num_gts = np.bincount(np.concatenate([a["lab_labels"] for a in aux] or [np.zeros(0, np.int64)]),
                          minlength=num_classes)
    return per_class_ap_flat(cls, score, best, label, num_gts, num_classes)


def per_class_ap_flat(cls: np.ndarray, score: np.ndarray, best: np.ndarray, label: np.ndarray,
                      num_gts: np.ndarray, num_classes: int) -> np.ndarray:
    """`per_class_ap` from flat arrays over all predictions: class, score, IoU of its best given
    box of its class (< 0: none) and that box's global index; ``num_gts`` given boxes per class.

    The matching runs once for all classes; then each class's true positives in score order go
    through cleanlab's own arithmetic (`_average_precision`), one class at a time (bounded memory).
    """
    # Per class, predictions by descending score (cleanlab sorts each class's predictions so).
    order = np.argsort(-score, kind="stable")
    # A stable sort of small integers is a radix sort in numpy: cheap next to the scores' sort.
    small = np.int16 if num_classes < 2**15 else np.int64
    order = order[np.argsort(cls[order].astype(small), kind="stable")]
    starts = np.searchsorted(cls[order], np.arange(num_classes + 1))
    inverse = np.empty(order.size, np.int32 if order.size < 2**31 else np.int64)
    inverse[order] = np.arange(order.size)
    del order
    eligible = np.flatnonzero(best >= IOU_THRESHOLDS[0])
    by_box = eligible[np.lexsort((-score[eligible], label[eligible]))]
    aps = np.zeros((len(IOU_THRESHOLDS), num_classes), dtype=np.float32)
    for t, iou in enumerate(IOU_THRESHOLDS):
        # cleanlab's greedy match (per image, by descending score, a prediction takes its best
        # same-class box if IoU >= iou and no earlier one took it) is the first prediction, by
        # descending score, of those whose best box is that box.
        matched = by_box[best[by_box] >= iou]
        first = matched[np.r_[True, label[matched][1:] != label[matched][:-1]]] if matched.size else matched
        hits = np.sort(inverse[first])  # the true positives' places in class-sorted order
        bounds = np.searchsorted(hits, starts)
        for c in range(num_classes):
            tp = np.zeros(int(starts[c + 1] - starts[c]), dtype=np.float32)
            tp[hits[bounds[c]:bounds[c + 1]] - starts[c]] = 1.0
            aps[t, c] = _average_precision(tp, num_gts[c])
    return aps.mean(axis=0).astype(np.float64)


def _average_precision(tp: np.ndarray, num_gts: int) -> np.float32:
    """cleanlab's ``_calculate_average_precision`` of one class's predictions (descending score)."""
    true_pos = np.cumsum(tp, dtype=np.float32)
    false_pos = np.cumsum(1.0 - tp, dtype=np.float32)
    eps = np.finfo(np.float32).eps
    recall = true_pos / np.maximum(np.array([num_gts]), eps)
    precision = true_pos / np.maximum(true_pos + false_pos, eps)
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # the precision envelope
    steps = np.flatnonzero(mrec[1:] != mrec[:-1])
    return np.float32(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))


def _best_same_class_label(aux: list[dict[str, Any]]):
    """Per prediction (all images, flattened): class, score, IoU of its best-overlapping given box
    of its own class (-1: none) and that box's global index."""
    cls, score, best, label = [], [], [], []
    offset = 0
    for a in aux:
        iou, lab, pred = a["iou_matrix"], a["lab_labels"], a["pred_labels"]
        cls.append(pred)
        score.append(a["pred_label_probs"])
        if iou.shape[0] and pred.size:
            same = np.where(lab[:, None] == pred[None, :], iou, -1.0)
            best.append(same.max(axis=0))
            label.append(same.argmax(axis=0) + offset)
        else:
            best.append(np.full(pred.size, -1.0))
            label.append(np.zeros(pred.size, dtype=np.int64))
        offset += lab.size
    cat = lambda parts, dtype: np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)  # noqa: E731
    return cat(cls, np.int64), cat(score, np.float64), cat(best, np.float64), cat(label, np.int64)


def auxiliary_inputs(labels: list[dict[str, np.ndarray]],
                     predictions: list[list[np.ndarray]]) -> list[dict[str, Any]]:
    """cleanlab's per-image ``auxiliary_inputs`` (what ``rank._get_valid_inputs_for_compute_scores``
    builds with a Python loop per box pair), computed with numpy.

    Per image: ``pred_bboxes`` float64 (M, 4), ``pred_labels`` int64 (M,), ``pred_label_probs``
    float64 (M,) (predicted boxes in class order, then table order, as cleanlab flattens them),
    ``lab_bboxes`` (L, 4), ``lab_labels`` (L,), ``iou_matrix`` and ``similarity_matrix`` float64
    (L, M), and ``min_possible_similarity``: the smallest non-zero similarity of the whole dataset.
    """
    from cleanlab.internal.constants import ALPHA, EPSILON, EUC_FACTOR

    out = []
    min_similarity = 1.0
    for label, prediction in zip(labels, predictions):
        counts = [len(p) for p in prediction]
        flat = (np.concatenate(prediction).astype(np.float64) if sum(counts)
                else np.zeros((0, 5), dtype=np.float64))
        lab = np.asarray(label["bboxes"], dtype=np.float64).reshape(-1, 4)
        pred = flat[:, :4]
        iou = _iou_matrix(lab, pred, EPSILON)
        centre = lambda b: np.stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2], axis=1)  # noqa: E731
        dist = np.linalg.norm(centre(lab)[:, None, :] - centre(pred)[None, :, :], axis=2)
        similarity = iou * ALPHA + (1 - ALPHA) * np.exp(-dist * EUC_FACTOR)
        nonzero = similarity[similarity != 0]
        if nonzero.size:
            min_similarity = min(min_similarity, float(nonzero.min()))
        out.append({
            "pred_labels": np.repeat(np.arange(len(prediction), dtype=np.int64), counts),
            "pred_label_probs": flat[:, 4].copy(),
            "pred_bboxes": pred,
            "lab_labels": np.asarray(label["labels"], dtype=np.int64),
            "lab_bboxes": lab,
            "similarity_matrix": similarity,
            "iou_matrix": iou,
        })
    for a in out:
        a["min_possible_similarity"] = min_similarity
    return out


def _iou_matrix(a: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    """float64 (len(a), len(b)) IoU of xyxy boxes, as cleanlab's ``rank._get_iou`` computes it."""
    left = np.maximum(a[:, None, 0], b[None, :, 0])
    top = np.maximum(a[:, None, 1], b[None, :, 1])
    right = np.minimum(a[:, None, 2], b[None, :, 2])
    bottom = np.minimum(a[:, None, 3], b[None, :, 3])
    apart = (right < left) | (bottom < top)
    inter = np.where(apart, 0.0, (right - left) * (bottom - top))
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = np.clip(area_a[:, None] + area_b[None, :] - inter, eps, None)
    return np.where(apart, 0.0, inter / union)
