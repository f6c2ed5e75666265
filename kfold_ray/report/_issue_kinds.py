"""Stage "report", part 2 (`kfold_ray.report._rank` calls it) for a run without box losses:
which kind of problem an image most likely has, and on which boxes, from cleanlab's subtype
scores (the subtype with the lowest pooled score). With the fold models' box losses the kinds
come from the per-box ranking instead (`kfold_ray.report._box_issues`). Each image's boxes are
written as a JSON list for a person to look at (`_record`).
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from ..data._dataset import CocoDataset

#: cleanlab's subtypes; with box losses, a given box can also be "spurious" (no object in it).
CLEANLAB_KINDS: tuple[str, ...] = ("overlooked", "swapped", "badly_located")
ISSUE_KINDS: tuple[str, ...] = (*CLEANLAB_KINDS, "spurious")
#: A per-box subtype score below this is evidence of that kind of problem on that box. Overlooked
#: scores of candidate boxes are always <= 0.1 (they overlap no given box); a swap score < 0.5
#: means a confident other-class prediction overlaps the box well; a badloc score < 0.5 means the
#: best same-class prediction overlaps it with IoU below ~0.5.
KIND_CUT = 0.5
#: A prediction overlapping no given box above this IoU is "unmatched" (a possibly missing label).
UNMATCHED_IOU = 0.5


def raw_probs(a: dict[str, Any]) -> np.ndarray:
    """An image's prediction scores as the model gave them (before any calibration)."""
    return a.get("raw_label_probs", a["pred_label_probs"])


def explain_images(dataset: CocoDataset, aux: list[dict[str, Any]], per_box: dict[str, list[np.ndarray]],
                   pooled: dict[str, np.ndarray], is_issue: np.ndarray) -> tuple[list[str], list[str]]:
    """Per image: the most likely kind of problem and the JSON list of the boxes concerned.

    The kind is the cleanlab subtype with the lowest pooled score, named when cleanlab flags the
    image or some box shows evidence (a per-box score below `KIND_CUT`); else "". The boxes are
    those of any cleanlab kind with evidence, plus the worst box of the named kind, sorted by
    their per-box score.
    """
    keep = ~np.asarray(dataset.iscrowd, dtype=bool)
    kept_before = np.concatenate([[0], np.cumsum(keep)])
    ann_ids = dataset.ann_ids[keep]
    starts = kept_before[dataset.ann_offsets[:-1]]
    names = dataset.class_names
    stacked = np.stack([pooled[k] for k in CLEANLAB_KINDS], axis=1)  # (N, 3)
    kinds, boxes = [], []
    for i, a in enumerate(aux):
        scores = {k: np.asarray(per_box[k][i], dtype=np.float64) for k in CLEANLAB_KINDS}
        ids = ann_ids[starts[i]:]
        evidence = any(np.any(s[~np.isnan(s)] < KIND_CUT) for s in scores.values())
        kind = CLEANLAB_KINDS[int(np.argmin(stacked[i]))] if (is_issue[i] or evidence) else ""
        if kind and stacked[i].min() >= 1.0:
            kind = ""  # flagged by cleanlab's thresholds, yet no subtype shows anything
        kinds.append(kind)
        boxes.append(json.dumps(_box_records(a, scores, kind, ids, names), separators=(",", ":")))
    return kinds, boxes


def rank_fraction(x: np.ndarray) -> np.ndarray:
    """Each value's rank among ``x`` as a fraction in [0, 1] (ties share their mean rank)."""
    from scipy.stats import rankdata

    return (rankdata(x) - 1) / max(len(x) - 1, 1)


def _box_records(a: dict[str, Any], scores: dict[str, np.ndarray], kind: str,
                 ann_ids: np.ndarray, names: list[str]) -> list[dict[str, Any]]:
    """JSON-ready records (`_record`) of an image's boxes with cleanlab evidence (a per-box score
    below `KIND_CUT`), plus the worst box of ``kind``, worst first."""
    chosen: list[tuple[float, str, int]] = []
    for k in CLEANLAB_KINDS:
        s = scores[k]
        valid = np.flatnonzero(~np.isnan(s))
        chosen += [(float(s[j]), k, int(j)) for j in valid if s[j] < KIND_CUT]
        if k == kind and valid.size and not any(c[1] == k for c in chosen):
            j = int(valid[np.argmin(s[valid])])
            chosen.append((float(s[j]), k, j))
    chosen.sort(key=lambda c: (c[0], CLEANLAB_KINDS.index(c[1]), c[2]))
    return [_record(a, k, j, scores, ann_ids, names) for _, k, j in chosen]


def _record(a: dict[str, Any], kind: str, j: int, scores: dict[str, np.ndarray],
            ann_ids: np.ndarray, names: list[str]) -> dict[str, Any]:
    """One box concerned, JSON-ready.

    overlooked: ``{"kind", "source": "predicted", "bbox", "class", "class_index", "score",
    "box_score"}``; swapped and badly_located: ``{"kind", "source": "given", "annotation_id",
    "bbox", "class", "class_index", "box_score", "predicted": {"bbox", "class", "class_index",
    "score"} or null}`` where ``predicted`` is the prediction the given box was compared with
    (`_compared_with`). ``box_score`` is cleanlab's per-box subtype score (lower = more likely
    wrong); ``score`` is the model's own (raw) score, and ``calibrated_score`` is added when the
    ranking calibrated it. (With box losses the records come from
    `kfold_ray.report._box_issues._record`.)
    """
    box_score = _num(scores[kind][j]) if j < len(scores[kind]) else None
    if kind == "overlooked":
        c = int(a["pred_labels"][j])
        return {"kind": kind, "source": "predicted", "bbox": _box(a["pred_bboxes"][j]),
                "class": names[c], "class_index": c, **_scores_of(a, j), "box_score": box_score}
    c = int(a["lab_labels"][j])
    m = _compared_with(a, kind, j)
    predicted = None
    if m >= 0:
        pc = int(a["pred_labels"][m])
        predicted = {"bbox": _box(a["pred_bboxes"][m]), "class": names[pc], "class_index": pc,
                     **_scores_of(a, m)}
    out = {"kind": kind, "source": "given", "annotation_id": int(ann_ids[j]),
           "bbox": _box(a["lab_bboxes"][j]), "class": names[c], "class_index": c,
           "box_score": box_score, "predicted": predicted}
    return out


def _compared_with(a: dict[str, Any], kind: str, j: int) -> int:
    """The prediction given box j was compared with, or -1: for a swap, the most similar confident
    prediction of another class (cleanlab's rule), else the best-overlapping one of another class;
    for a bad location, the most similar same-class prediction scoring > 0.5 that overlaps it
    (cleanlab's rule), else the best-overlapping one of its class."""
    from cleanlab.internal.constants import (
        HIGH_PROBABILITY_THRESHOLD,
        LOW_PROBABILITY_THRESHOLD,
    )

    same = a["pred_labels"] == a["lab_labels"][j]
    overlaps = a["iou_matrix"][j] > 0
    if kind == "swapped":
        strict, loose = ~same & (a["pred_label_probs"] > HIGH_PROBABILITY_THRESHOLD), ~same & overlaps
    else:
        strict = same & (a["pred_label_probs"] > LOW_PROBABILITY_THRESHOLD) & overlaps
        loose = same & overlaps
    if strict.any():
        return int(np.flatnonzero(strict)[np.argmax(a["similarity_matrix"][j][strict])])
    if loose.any():
        return int(np.flatnonzero(loose)[np.argmax(a["iou_matrix"][j][loose])])
    return -1


def _scores_of(a: dict[str, Any], m: int) -> dict[str, float | None]:
    raw = raw_probs(a)
    out = {"score": _num(raw[m])}
    if raw is not a["pred_label_probs"]:
        out["calibrated_score"] = _num(a["pred_label_probs"][m])
    return out


def _box(b: np.ndarray) -> list[float]:
    return [round(float(v), 2) for v in b]


def _num(v: float) -> float | None:
    v = float(v)
    return None if math.isnan(v) else round(v, 6)
