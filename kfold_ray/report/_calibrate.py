"""Cross-fitted per-class calibration of detection scores (issue 9).

cleanlab's ObjectLab reads a detection score as a probability: it only trusts predictions scoring
>= 0.95 when it looks for overlooked and swapped boxes. Detectors trained briefly are
under-confident (benchmarks/README.md: fold models from scratch scored >= 0.95 on ~20 % of the
true digits), so their scores are mapped, per class, to the share of predictions at that score
that are right against the given labels:

    right           the prediction overlaps a given box of its own class with IoU >= `MATCH_IOU`
    map             isotonic regression of right on score (scikit-learn), from at least
                    `MIN_ISOTONIC` predictions of the class; Platt scaling (logistic regression
                    on the logit of the score) from at least `MIN_PLATT`; else the scores are
                    kept as they are. Two pseudo-observations (wrong at score 0, right at 1) keep
                    a map defined when a class has one outcome only
    cross-fitting   the predictions of the images of group g (the fold that held them out) are
                    mapped by a map fitted on the OTHER groups' images only, so that an image's own
                    (possibly wrong) labels never pull its calibrated scores towards them

A map is non-decreasing, so each image keeps its per-class order of predictions (cleanlab expects
them by descending score).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = ["MATCH_IOU", "calibrate_scores", "cross_fitted_scores", "prediction_is_right"]

MATCH_IOU = 0.5
MIN_ISOTONIC = 30
MIN_PLATT = 6
_EPS = 1e-6  # calibrated scores stay in [_EPS, 1]: a zero would read as "no prediction" downstream


def calibrate_scores(aux: list[dict[str, Any]], group_of_image: np.ndarray) -> np.ndarray:
    """Replace each image's ``pred_label_probs`` in ``aux`` (`kfold_ray.report._objectlab.auxiliary_inputs`)
    by its cross-fitted calibrated scores, keeping the raw ones as ``raw_label_probs``.

    Args:
        aux: per-image auxiliary inputs; changed in place.
        group_of_image: int (N,) cross-fitting group of each image (its fold).

    Returns:
        float64 (M,) the calibrated scores of all predictions, flattened in image order.
    """
    raw = _flat(aux, "pred_label_probs", np.float64)
    classes = _flat(aux, "pred_labels", np.int64)
    counts = np.array([a["pred_labels"].size for a in aux], dtype=np.int64)
    groups = np.repeat(np.asarray(group_of_image, dtype=np.int64), counts)
    calibrated = cross_fitted_scores(raw, classes, prediction_is_right(aux), groups)
    for a, s, e in zip(aux, np.cumsum(counts) - counts, np.cumsum(counts)):
        a["raw_label_probs"] = a["pred_label_probs"]
        a["pred_label_probs"] = calibrated[s:e]
    return calibrated


def prediction_is_right(aux: list[dict[str, Any]]) -> np.ndarray:
    """bool (M,), flattened in image order: the prediction overlaps a given box of its own class
    with IoU >= `MATCH_IOU`."""
    parts = []
    for a in aux:
        iou, lab, pred = a["iou_matrix"], a["lab_labels"], a["pred_labels"]
        hit = (iou >= MATCH_IOU) & (lab[:, None] == pred[None, :])
        parts.append(hit.any(axis=0) if iou.shape[0] else np.zeros(pred.size, dtype=bool))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=bool)


def cross_fitted_scores(scores: np.ndarray, classes: np.ndarray, right: np.ndarray,
                        groups: np.ndarray) -> np.ndarray:
    """float64 (M,): each prediction's score through the map of its class fitted on the
    predictions of every other group."""
    scores = np.asarray(scores, dtype=np.float64)
    out = scores.copy()
    by_class = np.argsort(classes, kind="stable")
    bounds = np.flatnonzero(np.diff(classes[by_class])) + 1
    for rows in np.split(by_class, bounds) if by_class.size else []:
        for g in np.unique(groups[rows]):
            mine = groups[rows] == g
            train = rows[~mine]
            out[rows[mine]] = fit_map(scores[train], right[train])(scores[rows[mine]])
    return np.clip(out, _EPS, 1.0)


def fit_map(scores: np.ndarray, right: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """The calibration map fitted on one class's (score, right) pairs: isotonic from
    `MIN_ISOTONIC` points, Platt from `MIN_PLATT`, else the identity.

    Two pseudo-observations join the points, a wrong one at score 0 and a right one at score 1,
    so that a class whose held-in predictions were all right (or all wrong) still gets a map:
    a model that is always right at 0.6 should read 0.6 as "certain", not keep it.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.size < MIN_PLATT:
        return lambda s: np.asarray(s, dtype=np.float64)
    x = np.concatenate([scores, [0.0, 1.0]])
    y = np.concatenate([np.asarray(right, dtype=np.float64), [0.0, 1.0]])
    if scores.size >= MIN_ISOTONIC:
        from sklearn.isotonic import IsotonicRegression

        return IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(x, y).predict
    from sklearn.linear_model import LogisticRegression

    platt = LogisticRegression().fit(_logit(x)[:, None], y)
    if platt.coef_[0, 0] <= 0:  # a decreasing map would reorder the class's predictions
        return lambda s: np.asarray(s, dtype=np.float64)
    return lambda s: platt.predict_proba(_logit(s)[:, None])[:, 1]


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), _EPS, 1 - _EPS)
    return np.log(p / (1 - p))


def _flat(aux: list[dict[str, Any]], key: str, dtype) -> np.ndarray:
    return np.concatenate([a[key] for a in aux]).astype(dtype) if aux else np.zeros(0, dtype)
