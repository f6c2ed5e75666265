"""The per-box ranking: one row per given box and per unmatched prediction, its kind of problem,
its score and the signals behind it, worst first (box_issues.parquet, ``result.box_issues()``).

Each kind has one signal (`kfold_ray.report._box_signals`): swapped, badly_located and spurious
over the given boxes, overlooked over the unmatched predictions. They are combined without
weights, by rank: a row's ``signal_rank`` under a kind is 1 + the number of rows of that kind's
population with a larger signal; its ``kind`` is the kind in which it ranks best, and the table
is sorted by that rank (so the lists of the four kinds interleave, the worst of each first,
whatever the scale of each signal and however many rows each population has). ``score`` is the
same order as a number in (0, 1]: 1 - (rank - 1) / rows.

A row's kind is ``named`` when its signal is also evidence: an outlier of its population (above
Tukey's fence, Q3 + 1.5 IQR, whatever the strength of the models) or past the point where the
model's own outputs decide it (`NAMED_ABOVE`); the per-image ranking names an image's kind from
its worst row that way ("" when that row is not named).

Columns (`BOX_ISSUE_SCHEMA`), sorted by ``rank``:

    rank            int32   1 = most likely wrong
    image_index     int64   position of the image in the dataset
    image_id        int64   COCO image id
    fold            int32   fold whose model held the image out
    source          string  "given" (a given box) | "predicted" (an unmatched prediction)
    annotation_id   int64   the given box's COCO annotation id (null for a prediction)
    class_index     int32   the given class, or the predicted class
    category_id     int64   its COCO category id
    x1, y1, x2, y2  float32 the box, absolute pixels
    kind            string  swapped | badly_located | spurious | overlooked
    named           bool    the signal of ``kind`` is an outlier (see above)
    score           float64 (0, 1], higher = more likely wrong
    signal_rank     int64   the row's rank under ``kind``
    swap_signal, shift_signal, spurious_signal, overlooked_signal  float64 the signals (null
                    where they do not apply)
    suggested_class_index  int32  the class the model sees instead (swapped), or the predicted
                    class (overlooked); -1: none
    best_x1, best_y1, best_x2, best_y2  float32  the model's best box for a given box (its
                    claim), the prediction itself for an overlooked row; null: none
    best_score, best_class_index  float32, int32  that prediction's score and class (-1: none)
    p_given, p_other, p_background, refined_iou, loss_cls, loss_box_reg  float32 the fold model's
                    heads on the given box (box_losses.parquet; null where the run lacks them)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from ..storage._atomic import atomic_path
from ._box_signals import BoxSignals

if TYPE_CHECKING:
    from ..data._dataset import CocoDataset

__all__ = ["BOX_ISSUE_SCHEMA", "BOX_KINDS", "ImageWorst", "rank_boxes", "write_box_issues"]

BOX_KINDS: tuple[str, ...] = ("swapped", "badly_located", "spurious", "overlooked")
_GIVEN_KINDS = BOX_KINDS[:3]
#: A kind is also named, outlier or not, where the model's own outputs decide it: another class
#: more likely than the given one; the box overlapping where the model would put it by less than
#: COCO's match criterion (IoU 0.5); background more likely than not; a prediction more likely
#: right than not.
NAMED_ABOVE = {"swapped": 0.0, "badly_located": 0.5, "spurious": 0.5, "overlooked": 0.5}
_SIGNAL_COLUMN = {"swapped": "swap_signal", "badly_located": "shift_signal",
                  "spurious": "spurious_signal", "overlooked": "overlooked_signal"}
_HEAD_TERMS = ("p_given", "p_other", "p_background", "refined_iou", "loss_cls", "loss_box_reg")

BOX_ISSUE_SCHEMA = pa.schema([
    ("rank", pa.int32()), ("image_index", pa.int64()), ("image_id", pa.int64()),
    ("fold", pa.int32()), ("source", pa.string()), ("annotation_id", pa.int64()),
    ("class_index", pa.int32()), ("category_id", pa.int64()),
    ("x1", pa.float32()), ("y1", pa.float32()), ("x2", pa.float32()), ("y2", pa.float32()),
    ("kind", pa.string()), ("named", pa.bool_()), ("score", pa.float64()),
    ("signal_rank", pa.int64()),
    *[(c, pa.float64()) for c in _SIGNAL_COLUMN.values()],
    ("suggested_class_index", pa.int32()),
    ("best_x1", pa.float32()), ("best_y1", pa.float32()), ("best_x2", pa.float32()),
    ("best_y2", pa.float32()), ("best_score", pa.float32()), ("best_class_index", pa.int32()),
    *[(t, pa.float32()) for t in _HEAD_TERMS],
])
BOX_ISSUE_COLUMNS: tuple[str, ...] = tuple(BOX_ISSUE_SCHEMA.names)


@dataclass
class ImageWorst:
    """Per image (N,): its worst row's ``score`` (0: no row), ``kind`` ("" when not named), and
    the rows of the table (positions) that belong to it, worst first (``rows_of[i]``)."""

    score: np.ndarray
    kind: list[str]
    first_row: np.ndarray
    row_image: np.ndarray


def rank_boxes(dataset: CocoDataset, sig: BoxSignals, fold_of_image: np.ndarray
               ) -> tuple[pa.Table, ImageWorst]:
    """The per-box table (`BOX_ISSUE_SCHEMA`, worst first) and each image's worst row."""
    n_given = sig.g_image.size
    pred_rows = np.flatnonzero(sig.unmatched)
    given_values = {k: getattr(sig, k) for k in _GIVEN_KINDS}
    ranks = np.stack([_competition_rank(given_values[k]) for k in _GIVEN_KINDS], axis=1) \
        if n_given else np.zeros((0, 3), np.int64)
    g_kind = ranks.argmin(axis=1) if n_given else np.zeros(0, np.int64)
    g_key = ranks.min(axis=1) if n_given else np.zeros(0, np.int64)
    g_second = np.sort(ranks, axis=1)[:, 1] if n_given else np.zeros(0, np.int64)
    overlooked = sig.overlooked[pred_rows]
    p_key = _competition_rank(overlooked)
    fences = {k: _tukey_fence(v) for k, v in given_values.items()}
    fences["overlooked"] = _tukey_fence(overlooked)
    key = np.concatenate([g_key, p_key])
    kind = np.concatenate([g_kind, np.full(pred_rows.size, 3, np.int64)])
    image = np.concatenate([sig.g_image, sig.p_image[pred_rows]])
    second = np.concatenate([g_second, np.full(pred_rows.size, np.iinfo(np.int64).max)])
    order = np.lexsort((image, second, key))
    n = key.size
    value = np.concatenate([np.choose(g_kind, [given_values[k] for k in _GIVEN_KINDS])
                            if n_given else np.zeros(0), overlooked])
    cut = np.array([min(fences[k], NAMED_ABOVE[k]) for k in BOX_KINDS])
    named = value > cut[kind]
    score = 1.0 - (key - 1) / max(n, 1)
    table = _table(dataset, sig, fold_of_image, pred_rows, order, key, kind, named, score)
    return table, _per_image(dataset.num_images, image[order], score[order], kind[order],
                             named[order])


def _table(dataset: CocoDataset, sig: BoxSignals, fold_of_image: np.ndarray, pred_rows,
           order, key, kind, named, score) -> pa.Table:
    n_given = sig.g_image.size
    nan = lambda k: np.full(k, np.nan)  # noqa: E731
    is_given = np.r_[np.ones(n_given, bool), np.zeros(pred_rows.size, bool)][order]
    image = np.concatenate([sig.g_image, sig.p_image[pred_rows]])[order]
    claim = sig.claim
    best = np.concatenate([_take(sig.p_box, claim, np.nan), sig.p_box[pred_rows]])[order]
    best_score = np.concatenate([_take(sig.p_score, claim, np.nan), sig.p_score[pred_rows]])[order]
    best_class = np.concatenate([_take(sig.p_class, claim, -1), sig.p_class[pred_rows]])[order]
    boxes = np.concatenate([sig.g_box, sig.p_box[pred_rows]])[order]
    cls = np.concatenate([sig.g_class, sig.p_class[pred_rows]])[order]
    ann = np.concatenate([dataset.ann_ids[sig.g_row], np.zeros(pred_rows.size, np.int64)])[order]
    suggested = np.concatenate([sig.suggested_class, sig.p_class[pred_rows]])[order]
    columns = {
        "rank": np.arange(1, order.size + 1, dtype=np.int32), "image_index": image,
        "image_id": dataset.image_ids[image], "fold": np.asarray(fold_of_image)[image].astype(np.int32),
        "source": pa.DictionaryArray.from_arrays(pa.array((~is_given).astype(np.int8)),
                                                 pa.array(["given", "predicted"])).cast(pa.string()),
        "annotation_id": pa.array(ann, mask=~is_given),
        "class_index": cls.astype(np.int32), "category_id": dataset.category_ids[cls],
        **{c: boxes[:, j] for j, c in enumerate(("x1", "y1", "x2", "y2"))},
        "kind": pa.DictionaryArray.from_arrays(pa.array(kind[order].astype(np.int8)),
                                               pa.array(list(BOX_KINDS))).cast(pa.string()),
        "named": named[order], "score": score[order], "signal_rank": key[order],
        "swap_signal": np.r_[sig.swapped, nan(pred_rows.size)][order],
        "shift_signal": np.r_[sig.badly_located, nan(pred_rows.size)][order],
        "spurious_signal": np.r_[sig.spurious, nan(pred_rows.size)][order],
        "overlooked_signal": np.r_[nan(n_given), sig.overlooked[pred_rows]][order],
        "suggested_class_index": suggested.astype(np.int32),
        **{c: best[:, j] for j, c in enumerate(("best_x1", "best_y1", "best_x2", "best_y2"))},
        "best_score": best_score, "best_class_index": best_class.astype(np.int32),
    }
    for t in _HEAD_TERMS:
        columns[t] = np.r_[sig.terms.get(t, nan(n_given)), nan(pred_rows.size)][order]
    arrays = [columns[f.name] if isinstance(columns[f.name], pa.Array)
              else pa.array(columns[f.name], type=f.type, from_pandas=True)
              for f in BOX_ISSUE_SCHEMA]
    return pa.Table.from_arrays(arrays, schema=BOX_ISSUE_SCHEMA)


def _take(values: np.ndarray, index: np.ndarray, fill) -> np.ndarray:
    """values[index] where index >= 0, else ``fill`` (also when ``values`` is empty)."""
    dtype = np.result_type(values.dtype, np.asarray(fill).dtype)
    out = np.full((index.size, *values.shape[1:]), fill, dtype=dtype)
    ok = index >= 0
    out[ok] = values[index[ok]]
    return out


def _per_image(num_images: int, image: np.ndarray, score: np.ndarray, kind: np.ndarray,
               named: np.ndarray) -> ImageWorst:
    """Each image's first (worst) row of the sorted table."""
    first = np.full(num_images, -1, np.int64)
    rows = np.arange(image.size)
    # The first occurrence of each image in the sorted rows: write in reverse, the first wins.
    first[image[::-1]] = rows[::-1]
    has = first >= 0
    worst = np.zeros(num_images)
    worst[has] = score[first[has]]
    kinds = [""] * num_images
    for i in np.flatnonzero(has).tolist():
        r = first[i]
        if named[r]:
            kinds[i] = BOX_KINDS[int(kind[r])]
    return ImageWorst(score=worst, kind=kinds, first_row=first, row_image=image)


def _competition_rank(values: np.ndarray) -> np.ndarray:
    """int64: 1 + the number of values strictly larger (NaN: ranked after every number)."""
    values = np.asarray(values, dtype=np.float64)
    out = np.full(values.size, values.size + 1, dtype=np.int64)
    ok = ~np.isnan(values)
    v = values[ok]
    desc = -np.sort(-v)
    out[ok] = np.searchsorted(-desc, -v, side="left") + 1
    return out


def _tukey_fence(values: np.ndarray) -> float:
    """Q3 + 1.5 IQR of the finite values (inf when there are none)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[~np.isnan(v)]
    if not v.size:
        return np.inf
    q1, q3 = np.percentile(v, [25, 75])
    return float(q3 + 1.5 * (q3 - q1))


def write_box_issues(folder: str | os.PathLike[str], table: pa.Table) -> Path:
    """Write ``box_issues.parquet`` into ``folder``, atomically."""
    import pyarrow.parquet as pq

    from ..storage._rundir import BOX_ISSUES_PARQUET

    path = Path(folder) / BOX_ISSUES_PARQUET
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    return path


# ---- per image: the boxes concerned, for a person to look at --------------------------------------
#: At most this many boxes per image in label_issues' ``boxes`` (its worst rows).
RECORDS_PER_IMAGE = 10


def image_records(table: pa.Table, num_images: int, class_names: list[str]) -> list[list[dict]]:
    """Per image: JSON-ready records of its worst row and of its other named rows (up to
    `RECORDS_PER_IMAGE`), worst first (see `_record`)."""
    image = table.column("image_index").to_numpy()
    named = table.column("named").to_numpy(zero_copy_only=False)
    first = np.zeros(image.size, dtype=bool)
    seen = np.full(num_images, -1, np.int64)
    seen[image[::-1]] = np.arange(image.size)[::-1]
    first[seen[seen >= 0]] = True
    chosen = np.flatnonzero(named | first)
    chosen = chosen[np.argsort(image[chosen], kind="stable")]  # by image, each worst first
    starts = np.searchsorted(image[chosen], np.arange(num_images + 1))
    keep = np.concatenate([chosen[starts[i]:min(starts[i + 1], starts[i] + RECORDS_PER_IMAGE)]
                           for i in range(num_images)] or [np.zeros(0, np.int64)])
    rows = table.take(pa.array(keep)).to_pydict()
    out: list[list[dict]] = [[] for _ in range(num_images)]
    for j in range(len(keep)):
        out[rows["image_index"][j]].append(_record({k: v[j] for k, v in rows.items()}, class_names))
    return out


def _record(row: dict, names: list[str]) -> dict:
    """One box, JSON-ready. Given: ``{"kind", "source": "given", "annotation_id", "bbox",
    "class", "class_index", "box_score", "named", "predicted": {"bbox", "class", "class_index",
    "score"} or null (the model's best box for it), "suggested": {"class", "class_index"} or
    null, and the head's terms the run has}``. Overlooked: ``{"kind", "source": "predicted",
    "bbox", "class", "class_index", "score", "box_score", "named"}``."""
    r = lambda v: None if v is None or v != v else round(float(v), 6)  # noqa: E731
    box = [round(float(row[c]), 2) for c in ("x1", "y1", "x2", "y2")]
    c = int(row["class_index"])
    out = {"kind": row["kind"], "source": row["source"], "bbox": box, "class": names[c],
           "class_index": c}
    if row["source"] == "predicted":
        return {**out, "score": r(row["best_score"]), "box_score": r(row["score"]),
                "named": bool(row["named"])}
    predicted = None
    if row["best_x1"] is not None and row["best_x1"] == row["best_x1"]:
        b = int(row["best_class_index"])
        predicted = {"bbox": [round(float(row[f"best_{c}"]), 2) for c in ("x1", "y1", "x2", "y2")],
                     "class": names[b], "class_index": b, "score": r(row["best_score"])}
    s = int(row["suggested_class_index"])
    out = {**out, "annotation_id": int(row["annotation_id"]), "box_score": r(row["score"]),
           "named": bool(row["named"]), "predicted": predicted,
           "suggested": {"class": names[s], "class_index": s} if s >= 0 else None}
    out.update({t: r(row[t]) for t in _HEAD_TERMS if row[t] is not None and row[t] == row[t]})
    return out
