"""The suspects a person reviews: the worst images of a run's ranking, each with its given boxes
(COCO annotation ids kept), the out-of-fold predictions, our scores, and what the ranking says
of each box.

Every export (`_export_fiftyone`, `_export_labelstudio`, `_export_coco`) is written from these
plain records, never from the ranking table itself: what a box carries comes from ONE function,
`box_signals`, which reads the per-box ranking (``box_issues``: every given box's kind, score,
whether it is named and the class the model sees instead; the overlooked predictions), the
image ranking's ``boxes`` column (the boxes it names) and the run's ``box_losses.parquet`` (what
the fold model's heads say of every given box). Every export carries what it returns.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .._exceptions import ConfigError

if TYPE_CHECKING:
    import pyarrow as pa

    from ..data._dataset import CocoDataset

__all__ = ["GivenBox", "PredictedBox", "Suspect", "class_labels", "select_suspects",
           "with_image_paths"]

#: Per-image scores every export carries (columns of the ranking, `kfold_ray.report._rank`).
SCORE_COLUMNS = ("box_score", "quality_score", "combined_score", "loss_score", "unmatched_score",
                 "overlooked_score", "swap_score", "badloc_score")
#: Per-given-box loss terms (``box_losses.parquet``), when the run has them.
LOSS_TERMS = ("loss_cls", "loss_box_reg", "p_given", "p_background", "p_other", "refined_iou")
#: What the per-box ranking (`kfold_ray.report._box_issues`) says of each box: its kind, its
#: score (higher = more likely wrong), whether the kind is named (evidence, not just the likeliest).
BOX_ISSUE_TERMS = ("kind", "box_score", "named")


@dataclass(frozen=True)
class GivenBox:
    """A given (labelled) box: its COCO annotation id, class index, absolute ``[x1, y1, x2,
    y2]``, and its signals (`box_signals`): the loss terms, its ``kind`` / ``box_score`` /
    ``named`` from the per-box ranking, and ``suggested_class`` where the model sees another."""

    annotation_id: int
    class_index: int
    xyxy: tuple[float, float, float, float]
    signals: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PredictedBox:
    """An out-of-fold prediction: class index, absolute ``[x1, y1, x2, y2]``, score, and
    ``kind`` (e.g. ``overlooked``) in its signals when the ranking names it."""

    class_index: int
    xyxy: tuple[float, float, float, float]
    score: float
    signals: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Suspect:
    """One image to review, as the ranking saw it.

    Attributes:
        rank: 1 = most likely mislabelled.
        image_index, image_id, file_name, image_path: the image (its resolved path or URI).
        width, height: its size in pixels (as in the json).
        fold: the fold whose model predicted it (never trained on it).
        issue_kind: overlooked | swapped | badly_located | "".
        is_issue: cleanlab flags it.
        scores: `SCORE_COLUMNS` (None where the run could not compute one).
        given: its given non-crowd boxes, in json order.
        predicted: its out-of-fold predictions scoring at least the export's minimum, best first.
    """

    rank: int
    image_index: int
    image_id: int
    file_name: str
    image_path: str
    width: int
    height: int
    fold: int
    issue_kind: str
    is_issue: bool
    scores: dict[str, float | None]
    given: tuple[GivenBox, ...]
    predicted: tuple[PredictedBox, ...]


def class_labels(dataset: CocoDataset) -> list[str]:
    """The label of each class index in the review tools: its category name, or ``"name (id
    N)"`` where two categories share a name (a tool tells classes apart by their label)."""
    names = dataset.class_names
    twice = {n for n in names if names.count(n) > 1}
    return [f"{c.name} (id {c.id})" if c.name in twice else c.name for c in dataset.categories]


def with_image_paths(table: pa.Table, dataset: CocoDataset) -> pa.Table:
    """A label-issue table with ``image_path`` (each image's resolved path or URI, where a
    person or a review tool opens it) after ``file_name``."""
    paths = [dataset.image_path(int(i)) for i in table.column("image_index").to_pylist()]
    return table.add_column(table.column_names.index("file_name") + 1, "image_path", [paths])


def select_suspects(dataset: CocoDataset, ranking: pa.Table, predictions: Path, *, top: int,
                    box_losses: Path | None = None, box_issues: pa.Table | None = None,
                    min_score: float = 0.0) -> list[Suspect]:
    """The ``top`` worst images of ``ranking`` (worst first) as `Suspect` records.

    Args:
        dataset: the run's dataset.
        ranking: a label-issue table (`kfold_ray.report._rank`), worst first.
        predictions: the run's ``predictions.parquet``.
        box_losses: the run's ``box_losses.parquet`` (None: no loss terms on the boxes).
        box_issues: the per-box ranking (`kfold_ray.report._box_issues`; None: only the boxes
            the image ranking names carry a kind).
        min_score: predictions scoring below it are left out.
    """
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise ConfigError(f"top must be an integer >= 1, got {top!r}")
    if not (isinstance(min_score, (int, float)) and 0.0 <= min_score <= 1.0):
        raise ConfigError(f"min_score must be in [0, 1], got {min_score!r}")
    rows = ranking.slice(0, top).to_pylist()
    indices = [int(r["image_index"]) for r in rows]
    detections = _detections(predictions, indices, min_score)
    losses = _losses(box_losses, indices) if box_losses is not None else {}
    per_box = _per_box(box_issues, indices, class_labels(dataset)) if box_issues is not None else {}
    out = []
    for r in rows:
        i = int(r["image_index"])
        given_signals, predicted_signals = box_signals(r, losses, per_box.get(i, ({}, [])))
        out.append(Suspect(
            rank=int(r["rank"]), image_index=i, image_id=int(r["image_id"]),
            file_name=str(r["file_name"]), image_path=dataset.image_path(i),
            width=int(dataset.widths[i]), height=int(dataset.heights[i]), fold=int(r["fold"]),
            issue_kind=str(r["issue_kind"] or ""), is_issue=bool(r["is_issue"]),
            scores={c: _num(r.get(c)) for c in SCORE_COLUMNS},
            given=_given(dataset, i, given_signals),
            predicted=_predicted(detections.get(i), predicted_signals),
        ))
    return out


# ---- what each box carries: the one place a per-box ranking plugs in --------------------------------
def box_signals(row: dict[str, Any], losses: dict[int, dict[str, float | None]],
                per_box: tuple[dict[int, dict[str, Any]], list[dict[str, Any]]] = ({}, []),
                ) -> tuple[dict[int, dict[str, Any]], list[dict[str, Any]]]:
    """(signals per given annotation id, records of the predictions the ranking names).

    A given box gets its loss terms (``losses``: from ``box_losses.parquet``), what the per-box
    ranking says of it (``per_box``, `_per_box`: ``kind``, ``box_score``, higher = more likely
    wrong, ``named``, ``suggested_class``) and, when the image ranking's ``boxes`` column names
    it, that kind. An overlooked prediction is returned with its ``bbox``, ``class_index``,
    ``score``, ``kind`` and ``box_score``, to be matched to the predicted boxes by coordinates.
    """
    given_rows, predicted = per_box
    given = {ann: dict(terms) for ann, terms in losses.items()}
    for ann, signals in given_rows.items():
        given.setdefault(ann, {}).update(signals)
    predicted = list(predicted)
    for b in json.loads(row.get("boxes") or "[]"):
        named = {"kind": b["kind"], "box_score": b.get("box_score"), "named": b.get("named")}
        if b.get("source") == "given":
            box = given.setdefault(int(b["annotation_id"]), {})
            if "kind" not in box:  # worst first: a box named twice keeps its worst kind
                box.update(named)
        elif not any(np.allclose(p["bbox"], b["bbox"], atol=0.011) for p in predicted):
            predicted.append({**named, "bbox": b["bbox"], "class_index": b["class_index"],
                              "score": b.get("score")})
    return given, predicted


def _given(dataset: CocoDataset, i: int, signals: dict[int, dict[str, Any]]) -> tuple[GivenBox, ...]:
    lo = int(dataset.ann_offsets[i])
    boxes, classes, crowd = dataset.annotations_of(i)
    return tuple(
        GivenBox(int(dataset.ann_ids[lo + j]), int(classes[j]), _xyxy(boxes[j]),
                 signals.get(int(dataset.ann_ids[lo + j]), {}))
        for j in range(len(boxes)) if not crowd[j])


def _predicted(det: dict[str, np.ndarray] | None, named: list[dict[str, Any]]) -> tuple[PredictedBox, ...]:
    if det is None:
        return ()
    out = []
    for box, c, s in zip(det["boxes"], det["classes"], det["scores"]):
        signals = {}
        for n in named:  # the ranking rounds its boxes to 0.01 px
            if int(n["class_index"]) == int(c) and np.allclose(box, n["bbox"], atol=0.011):
                signals = {"kind": n["kind"], "box_score": n["box_score"], "named": n.get("named")}
        out.append(PredictedBox(int(c), _xyxy(box), round(float(s), 6), signals))
    return tuple(out)


def _detections(path: Path, indices: list[int], min_score: float) -> dict[int, dict[str, np.ndarray]]:
    """Per image index asked for: its predicted boxes (float (M, 4)), classes and scores,
    best first, those under ``min_score`` left out."""
    import pyarrow.parquet as pq

    if not indices:
        return {}
    table = pq.read_table(path, columns=["image_index", "class_index", "x1", "y1", "x2", "y2", "score"],
                          filters=[("image_index", "in", indices), ("score", ">=", float(min_score))])
    img = table.column("image_index").to_numpy()
    score = table.column("score").to_numpy()
    boxes = np.stack([table.column(c).to_numpy() for c in ("x1", "y1", "x2", "y2")], axis=1)
    classes = table.column("class_index").to_numpy()
    order = np.lexsort((-score, img))
    out = {}
    for i in np.unique(img):
        rows = order[img[order] == i]
        out[int(i)] = {"boxes": boxes[rows], "classes": classes[rows], "scores": score[rows]}
    return out


def _per_box(table: pa.Table, indices: list[int], labels: list[str]
             ) -> dict[int, tuple[dict[int, dict[str, Any]], list[dict[str, Any]]]]:
    """Per image index asked for: what the per-box ranking says of its given boxes (annotation
    id -> kind, box_score, named, suggested_class) and its overlooked predictions (records as in
    `box_signals`)."""
    import pyarrow.compute as pc

    rows = table.filter(pc.is_in(table.column("image_index"), _int64_array(indices))).to_pylist()
    out: dict[int, tuple[dict[int, dict[str, Any]], list[dict[str, Any]]]] = {}
    for r in rows:
        given, predicted = out.setdefault(int(r["image_index"]), ({}, []))
        signals = {"kind": r["kind"], "box_score": _num(r["score"]), "named": bool(r["named"])}
        if r["source"] == "given":
            suggested = r.get("suggested_class_index")
            if r["kind"] == "swapped" and suggested is not None and suggested >= 0:
                signals["suggested_class"] = labels[suggested]
            given[int(r["annotation_id"])] = signals
        else:
            predicted.append({**signals, "bbox": [r["x1"], r["y1"], r["x2"], r["y2"]],
                              "class_index": int(r["class_index"]), "score": _num(r.get("best_score"))})
    return out


def _int64_array(values: list[int]):
    import pyarrow as pa

    return pa.array(values, pa.int64())


def _losses(path: Path, indices: list[int]) -> dict[int, dict[str, float | None]]:
    """Annotation id -> its loss terms, for the given boxes of the images asked for."""
    import pyarrow.parquet as pq

    table = pq.read_table(path, filters=[("image_index", "in", indices)])
    if "annotation_id" not in table.column_names:
        return {}
    terms = [t for t in LOSS_TERMS if t in table.column_names]
    columns = {t: table.column(t).to_pylist() for t in terms}
    return {int(a): {t: _num(columns[t][k]) for t in terms}
            for k, a in enumerate(table.column("annotation_id").to_pylist())}


def _xyxy(box: np.ndarray) -> tuple[float, float, float, float]:
    return tuple(round(float(v), 3) for v in box)  # type: ignore[return-value]


def _num(v: Any) -> float | None:
    if v is None:
        return None
    v = float(v)
    return None if math.isnan(v) else round(v, 6)
