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
model's own outputs decide it (`NAMED_ABOVE`; a swap: its best other class beats the given one).

Per image (`image_kinds`, the per-image ranking's order and kind): per kind, its worst box of
that kind as a rank fraction over the images; the largest, and the kind giving it.

Columns (`BOX_ISSUE_SCHEMA`), sorted by ``rank``:

    rank            int32   1 = most likely wrong
    image_index     int64   position of the image in the dataset
    image_id        int64   COCO image id
    fold            int32   fold whose model held the image out
    source          string  "given" (a given box) | "predicted" (an unmatched prediction);
                            dictionary-encoded, as ``kind`` (a pandas category)
    annotation_id   int64   the given box's COCO annotation id (null for a prediction)
    class_index     int32   the given class, or the predicted class
    category_id     int64   its COCO category id
    x1, y1, x2, y2  float32 the box, absolute pixels
    kind            string  swapped | badly_located | spurious | overlooked
    named           bool    the signal of ``kind`` is evidence (see above)
    score           float64 (0, 1], higher = more likely wrong
    signal_rank     int64   the row's rank under ``kind``
    swap_signal, shift_signal, spurious_signal, overlooked_signal  float32 the signals (null
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

_DICT = pa.dictionary(pa.int8(), pa.string())
BOX_ISSUE_SCHEMA = pa.schema([
    ("rank", pa.int32()), ("image_index", pa.int64()), ("image_id", pa.int64()),
    ("fold", pa.int32()), ("source", _DICT), ("annotation_id", pa.int64()),
    ("class_index", pa.int32()), ("category_id", pa.int64()),
    ("x1", pa.float32()), ("y1", pa.float32()), ("x2", pa.float32()), ("y2", pa.float32()),
    ("kind", _DICT), ("named", pa.bool_()), ("score", pa.float64()),
    ("signal_rank", pa.int64()),
    *[(c, pa.float32()) for c in _SIGNAL_COLUMN.values()],
    ("suggested_class_index", pa.int32()),
    ("best_x1", pa.float32()), ("best_y1", pa.float32()), ("best_x2", pa.float32()),
    ("best_y2", pa.float32()), ("best_score", pa.float32()), ("best_class_index", pa.int32()),
    *[(t, pa.float32()) for t in _HEAD_TERMS],
])
BOX_ISSUE_COLUMNS: tuple[str, ...] = tuple(BOX_ISSUE_SCHEMA.names)


@dataclass
class ImageWorst:
    """Per image (N,): ``score`` in [0, 1] (0: no box, no unmatched prediction), its likeliest
    ``kind`` ("" when it has neither), and whether that kind is ``named`` (evidence)."""

    score: np.ndarray
    kind: list[str]
    named: np.ndarray


def rank_boxes(dataset: CocoDataset, sig: BoxSignals, fold_of_image: np.ndarray
               ) -> tuple[pa.Table, ImageWorst]:
    """The per-box table (`BOX_ISSUE_SCHEMA`, worst first) and the per-image scores and kinds
    (`image_kinds`).

    Unmatched predictions that rank below the first max(given boxes, images) of their kind are
    left out of the table: they would rank after every given box (whose ranks are at most that),
    and at COCO scale they are millions of low-score detections.
    """
    n_given = sig.g_image.size
    values = [getattr(sig, k) for k in _GIVEN_KINDS]
    ranks = np.stack([_competition_rank(v) for v in values], axis=1) if n_given \
        else np.zeros((0, 3), np.int64)
    g_kind = ranks.argmin(axis=1)
    g_key = ranks.min(axis=1)
    g_second = np.sort(ranks, axis=1)[:, 1] if n_given else np.zeros(0, np.int64)
    unmatched = np.flatnonzero(sig.unmatched)
    overlooked_all = sig.overlooked[unmatched]
    given_named = np.stack([_evidence(k, v, sig) for k, v in zip(_GIVEN_KINDS, values)], axis=1) \
        if n_given else np.zeros((0, 3), bool)
    unmatched_named = _evidence("overlooked", overlooked_all, sig)
    kept, p_key = _top_ranks(overlooked_all, max(n_given, dataset.num_images))
    pred_rows = unmatched[kept]
    key = np.concatenate([g_key, p_key])
    kind = np.concatenate([g_kind, np.full(pred_rows.size, 3, np.int64)])
    image = np.concatenate([sig.g_image, sig.p_image[pred_rows]])
    second = np.concatenate([g_second, np.full(pred_rows.size, np.iinfo(np.int64).max)])
    order = np.lexsort((image, second, key))
    named = np.concatenate([given_named[np.arange(n_given), g_kind], unmatched_named[kept]])
    score = 1.0 - (key - 1) / max(key.size, 1)
    table = _table(dataset, sig, fold_of_image, pred_rows, image, kind, named, score, key)
    table = table.take(pa.array(order))
    table = table.set_column(0, "rank", pa.array(np.arange(1, order.size + 1, dtype=np.int32)))
    per_image = image_kinds(dataset.num_images, sig, values, given_named, unmatched,
                            overlooked_all, unmatched_named)
    return table, per_image


def _evidence(kind: str, values: np.ndarray, sig: BoxSignals) -> np.ndarray:
    """bool: the signal of ``kind`` is an outlier of its population (Tukey's fence) or past the
    point where the model's own outputs decide it (`NAMED_ABOVE`; a swap: another class beats
    the given one)."""
    outlier = values > _tukey_fence(values)
    if kind == "swapped":
        return outlier | sig.swap_evidence
    return outlier | (values > NAMED_ABOVE[kind])


def image_kinds(num_images: int, sig: BoxSignals, values: list[np.ndarray], given_named: np.ndarray,
                unmatched: np.ndarray, overlooked: np.ndarray, unmatched_named: np.ndarray
                ) -> ImageWorst:
    """Per image and kind, its worst box of that kind (largest signal) as a rank fraction over
    the images (no weights, as `combined_score` does with two signals); the
    image's score is the largest of the four, its kind the one that gives it (the same kinds'
    order breaks ties), named when a box of that kind in the image is.

    Chosen on the digits benchmark (seed 0; benchmarks/README.md) over the images' best row of
    the per-box ranking: that one lets an image's given boxes compete with its unmatched
    predictions three lists to one."""
    from scipy.stats import rankdata

    fractions = np.zeros((4, num_images))
    named = np.zeros((4, num_images), dtype=bool)
    owners = [sig.g_image] * 3 + [sig.p_image[unmatched]]
    signals = [*values, overlooked]
    flags = [given_named[:, 0], given_named[:, 1], given_named[:, 2], unmatched_named]
    for k, (owner, v, flag) in enumerate(zip(owners, signals, flags)):
        ok = ~np.isnan(v)
        worst = np.full(num_images, -np.inf)
        np.maximum.at(worst, owner[ok], v[ok])
        has = np.isfinite(worst)
        # Ranked among all the images, those without a box of the kind below every other (and
        # at 0 themselves): having one at all is part of the evidence.
        fractions[k, has] = (rankdata(worst)[has] - 1) / max(num_images - 1, 1)
        np.logical_or.at(named[k], owner[ok], flag[ok])
    kind = fractions.argmax(axis=0)
    score = fractions.max(axis=0)
    rows = np.zeros(num_images, dtype=bool)
    for owner in (sig.g_image, sig.p_image[unmatched]):
        rows[owner] = True
    kinds = [BOX_KINDS[k] if r else "" for k, r in zip(kind.tolist(), rows.tolist())]
    return ImageWorst(score=np.where(rows, score, 0.0), kind=kinds,
                      named=named[kind, np.arange(num_images)] & rows)


def _table(dataset: CocoDataset, sig: BoxSignals, fold_of_image: np.ndarray, pred_rows,
           image, kind, named, score, key) -> pa.Table:
    """The rows unsorted: the given boxes, then the predictions ``pred_rows``."""
    n_given, n_pred = sig.g_image.size, pred_rows.size
    nan = np.full(n_pred, np.nan, dtype=np.float32)
    f32 = lambda *parts: np.concatenate([np.asarray(x, dtype=np.float32) for x in parts])  # noqa: E731
    claim = sig.claim
    best = np.concatenate([_take(sig.p_box, claim, np.nan), sig.p_box[pred_rows]]).astype(np.float32)
    boxes = np.concatenate([sig.g_box, sig.p_box[pred_rows]]).astype(np.float32)
    cls = np.concatenate([sig.g_class, sig.p_class[pred_rows]])
    is_pred = np.r_[np.zeros(n_given, np.int8), np.ones(n_pred, np.int8)]
    columns = {
        "rank": np.zeros(image.size, np.int32), "image_index": image,
        "image_id": dataset.image_ids[image], "fold": np.asarray(fold_of_image)[image],
        "source": _strings(is_pred, ("given", "predicted")),
        "annotation_id": pa.array(np.r_[dataset.ann_ids[sig.g_row], np.zeros(n_pred, np.int64)],
                                  mask=is_pred.astype(bool)),
        "class_index": cls, "category_id": dataset.category_ids[cls],
        **{c: boxes[:, j] for j, c in enumerate(("x1", "y1", "x2", "y2"))},
        "kind": _strings(kind.astype(np.int8), BOX_KINDS), "named": named, "score": score,
        "signal_rank": key,
        "swap_signal": f32(sig.swapped, nan), "shift_signal": f32(sig.badly_located, nan),
        "spurious_signal": f32(sig.spurious, nan),
        "overlooked_signal": f32(np.full(n_given, np.nan), sig.overlooked[pred_rows]),
        "suggested_class_index": np.concatenate([sig.suggested_class, sig.p_class[pred_rows]]),
        **{c: best[:, j] for j, c in enumerate(("best_x1", "best_y1", "best_x2", "best_y2"))},
        "best_score": f32(_take(sig.p_score, claim, np.nan), sig.p_score[pred_rows]),
        "best_class_index": np.concatenate([_take(sig.p_class, claim, -1), sig.p_class[pred_rows]]),
    }
    for t in _HEAD_TERMS:
        columns[t] = f32(sig.terms.get(t, np.full(n_given, np.nan)), nan)
    arrays = [columns[f.name] if isinstance(columns[f.name], pa.Array)
              else pa.array(columns[f.name], from_pandas=True).cast(f.type)
              for f in BOX_ISSUE_SCHEMA]
    return pa.Table.from_arrays(arrays, schema=BOX_ISSUE_SCHEMA)


def _strings(codes: np.ndarray, names: tuple[str, ...]) -> pa.Array:
    """Dictionary-encoded strings (one byte a row in memory and in Parquet)."""
    return pa.DictionaryArray.from_arrays(pa.array(codes, type=pa.int8()), pa.array(list(names)))


def _take(values: np.ndarray, index: np.ndarray, fill) -> np.ndarray:
    """values[index] where index >= 0, else ``fill`` (also when ``values`` is empty)."""
    dtype = np.result_type(values.dtype, np.asarray(fill).dtype)
    out = np.full((index.size, *values.shape[1:]), fill, dtype=dtype)
    ok = index >= 0
    out[ok] = values[index[ok]]
    return out


def _competition_rank(values: np.ndarray) -> np.ndarray:
    """int64: 1 + the number of values strictly larger (NaN: ranked after every number)."""
    values = np.asarray(values, dtype=np.float64)
    out = np.full(values.size, values.size + 1, dtype=np.int64)
    ok = np.flatnonzero(~np.isnan(values))
    order = ok[np.argsort(-values[ok], kind="stable")]
    v = values[order]
    # Each sorted position takes the position of the first of its run of equal values.
    starts = np.r_[True, v[1:] != v[:-1]] if v.size else np.zeros(0, bool)
    out[order] = np.maximum.accumulate(np.where(starts, np.arange(v.size), 0)) + 1
    return out


def _top_ranks(values: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(positions, competition ranks) of the values ranking within the first ``k`` (ties at the
    k-th value included), without sorting the rest."""
    ok = np.flatnonzero(~np.isnan(values))
    if ok.size > k > 0:
        kth = np.partition(values[ok], ok.size - k)[ok.size - k]  # the k-th largest
        ok = ok[values[ok] >= kth]
    elif k <= 0:
        ok = ok[:0]
    ranks = _competition_rank(values[ok])
    return ok, ranks


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
#: At most this many boxes per image in label_issues' ``boxes``: its worst row, then its other
#: named rows, worst first.
RECORDS_PER_IMAGE = 5


def image_records(table: pa.Table, num_images: int, class_names: list[str]) -> list[str]:
    """Per image: the JSON list of its worst row and its other named rows (up to
    `RECORDS_PER_IMAGE`), worst first (see `_records`)."""
    import json

    image = table.column("image_index").to_numpy()
    named = table.column("named").to_numpy(zero_copy_only=False)
    first = np.full(num_images, -1, np.int64)
    first[image[::-1]] = np.arange(image.size)[::-1]
    pick = named.copy()
    pick[first[first >= 0]] = True
    chosen = np.flatnonzero(pick)
    chosen = chosen[np.argsort(image[chosen], kind="stable")]  # by image, each worst first
    within = np.arange(chosen.size) - np.searchsorted(image[chosen], image[chosen])
    chosen = chosen[within < RECORDS_PER_IMAGE]
    out: list[list[dict]] = [[] for _ in range(num_images)]
    for owner, record in zip(image[chosen].tolist(), _records(table.take(pa.array(chosen)), class_names)):
        out[owner].append(record)
    return [json.dumps(r, separators=(",", ":")) for r in out]


def _records(rows: pa.Table, names: list[str]) -> list[dict]:
    """JSON-ready records of ``rows``. Given: ``{"kind", "source": "given", "annotation_id",
    "bbox", "class", "class_index", "box_score", "named", "predicted": {"bbox", "class",
    "class_index", "score"} or null (the model's best box for it), "suggested": {"class",
    "class_index"} or null, and the head's terms the run has}``. Overlooked: ``{"kind",
    "source": "predicted", "bbox", "class", "class_index", "score", "box_score", "named"}``."""
    def col(name: str, digits: int | None = None) -> list:
        a = rows.column(name)
        if digits is None:
            return a.to_pylist()
        v = np.round(a.to_numpy(zero_copy_only=False).astype(np.float64), digits)
        return [None if x != x else x for x in v.tolist()]

    box = np.round(np.stack([rows.column(c).to_numpy() for c in ("x1", "y1", "x2", "y2")], axis=1)
                   .astype(np.float64), 2).tolist()
    best = np.round(np.stack([rows.column(f"best_{c}").to_numpy(zero_copy_only=False)
                              for c in ("x1", "y1", "x2", "y2")], axis=1).astype(np.float64), 2).tolist() \
        if rows.num_rows else []
    kind, source, cls, ann = col("kind"), col("source"), col("class_index"), col("annotation_id")
    score, best_score, named = col("score", 6), col("best_score", 6), col("named")
    best_cls, suggested = col("best_class_index"), col("suggested_class_index")
    terms = {t: col(t, 6) for t in _HEAD_TERMS}
    out = []
    for j in range(rows.num_rows):
        c = cls[j]
        r = {"kind": kind[j], "source": source[j], "bbox": box[j], "class": names[c], "class_index": c}
        if source[j] == "predicted":
            r.update(score=best_score[j], box_score=score[j], named=named[j])
        else:
            b, sc = best_cls[j], suggested[j]
            r.update(annotation_id=ann[j], box_score=score[j], named=named[j],
                     predicted=None if b < 0 else {"bbox": best[j], "class": names[b],
                                                   "class_index": b, "score": best_score[j]},
                     suggested=None if sc < 0 else {"class": names[sc], "class_index": sc})
            r.update({t: v[j] for t, v in terms.items() if v[j] is not None})
        out.append(r)
    return out
