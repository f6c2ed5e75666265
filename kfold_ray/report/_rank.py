"""Stage "report": rank the images by how likely their labels are wrong, and every box.

One pass over every (given box, prediction) pair of the stitched predictions
(`kfold_ray.report._pairs`, `_scores`) gives cleanlab's object-detection scores, ONCE over the
whole table (its per-class thresholds depend on the whole dataset, cleanlab #1301), with
cleanlab's formulas (its own functions take hours at COCO scale; tests check both give the same
numbers), and the per-box signals (`_box_signals`) of the per-box ranking (`_box_issues`):

    quality_score   as ``cleanlab.object_detection.rank.get_label_quality_scores`` (1 = clean)
    is_issue        as ``cleanlab.object_detection.filter.find_label_issues``
    subtype scores  cleanlab's per-box scores (overlooked, swapped, badly located), pooled per
                    image as ``rank.pool_box_scores_per_image`` does; quality is their weighted
                    geometric mean

With ``calibrate``, cleanlab scores cross-fitted per-class calibrated detection scores
(`kfold_ray.report._calibrate`); the raw ones stay in the outputs and the box signals use them.

cleanlab's inputs are built in memory from the prediction table and the dataset reloaded from the
run's ``config.json`` (pickles from a run dir are never loaded: unpickling a file from someone
else's run dir could run code). Images without annotations get a score like any other (cleanlab
#1234 crashed on them when their boxes had shape (0,); ours are float32 (0, 4)).

Columns of ``label_issues.parquet`` / ``.csv`` (`LABEL_ISSUE_COLUMNS`), one row per image, worst first:

    rank            int32   1 = most likely mislabelled: by box_score when the run has box
                            losses, cleanlab's quality breaking ties; else by cleanlab's quality
    image_index     int64   position of the image in the dataset (json order)
    image_id        int64   COCO image id
    file_name       string  as in the json
    fold            int32   fold whose model predicted the image (-1 if unknown)
    quality_score   float64 cleanlab's label quality score in [0, 1]
    is_issue        bool    cleanlab flags the image (``find_label_issues``)
    issue_kind      string  the image's likeliest kind of problem: swapped | badly_located |
                            spurious | overlooked (`_box_issues.image_kinds`); "" for an image
                            with no given box and no unmatched prediction
    overlooked_score, swap_score, badloc_score  float64 cleanlab's pooled subtype scores (1 = no sign of it)
    num_given       int32   given (non-crowd) boxes
    num_predicted   int32   predicted boxes
    boxes           string  JSON list of the image's worst box and its other named boxes, worst
                            first (`_box_issues._records`)
    loss_score, unmatched_score, combined_score  float64  the worst given box's loss_cls +
                    loss_box_reg, the best prediction overlapping no given box, the larger of
                    their rank fractions (the order before box_score; see `_loss_signals`)
    box_score       float64 per kind, the image's worst box as a rank fraction over the images;
                    the largest (`_box_issues.image_kinds`); null without box losses
    named           bool    the kind is named: a box of that kind in the image is evidence
                            (`_box_issues`)

Higher signals = more likely wrong.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from .._exceptions import ConfigError
from ..storage import _rundir
from ..storage._atomic import atomic_path
from ._finished_run import IN_SAMPLE_DIR, PREDICTIONS, FinishedRun
from ._box_issues import image_records, rank_boxes, write_box_issues
from ._box_signals import UNMATCHED_IOU, box_signals, given_box_terms
from ._pairs import FlatBoxes, flatten, pair_chunks
from ._scores import PairStats, cleanlab_scores, pair_stats

if TYPE_CHECKING:
    from ..data._dataset import CocoDataset

__all__ = [
    "CALIBRATE_DEFAULT",
    "LABEL_ISSUE_COLUMNS",
    "issues_for_run",
    "label_issues_for_run",
    "rank_label_issues",
    "write_label_issues",
]

LABEL_ISSUES_PARQUET = _rundir.LABEL_ISSUES_PARQUET
LABEL_ISSUES_CSV = _rundir.LABEL_ISSUES_CSV
#: Whether the ranking calibrates scores by default (`kfold_ray.report._calibrate`). Off: on the example
#: (benchmarks/README.md, "Finding label errors") it lifts cleanlab's AUROC (0.55 -> 0.70 at 150
#: iterations, 0.59 -> 0.68 at 300) but leaves the default order (combined_score) as it was, and
#: for a confident, accurate detector it hurts: fitted against labels with errors, a map cannot
#: exceed the labels' accuracy, so 0.99 becomes ~0.9, under cleanlab's 0.95 threshold, and the
#: errors it found before are missed (tests/report/test_calibrate.py).
CALIBRATE_DEFAULT = False
_SIGNAL_COLUMNS = ("loss_score", "unmatched_score", "combined_score", "box_score")
#: The per-image signal the ranking orders images by when the run has box losses.
IMAGE_ORDER_SIGNAL = "box_score"


LABEL_ISSUE_SCHEMA = pa.schema([
    ("rank", pa.int32()),
    ("image_index", pa.int64()),
    ("image_id", pa.int64()),
    ("file_name", pa.string()),
    ("fold", pa.int32()),
    ("quality_score", pa.float64()),
    ("is_issue", pa.bool_()),
    ("issue_kind", pa.string()),
    ("overlooked_score", pa.float64()),
    ("swap_score", pa.float64()),
    ("badloc_score", pa.float64()),
    ("num_given", pa.int32()),
    ("num_predicted", pa.int32()),
    ("boxes", pa.string()),
    ("loss_score", pa.float64()),
    ("unmatched_score", pa.float64()),
    ("combined_score", pa.float64()),
    ("box_score", pa.float64()),
    ("named", pa.bool_()),
])
LABEL_ISSUE_COLUMNS: tuple[str, ...] = tuple(LABEL_ISSUE_SCHEMA.names)


# ---- the ranking ---------------------------------------------------------------------------------
def label_issues_for_run(
    run: FinishedRun, *, in_sample: bool = False, write: bool = True,
    calibrate: bool = CALIBRATE_DEFAULT,
) -> pa.Table:
    """The per-image ranking of `issues_for_run`. With ``write``, also writes
    ``label_issues.parquet``/``.csv`` and ``box_issues.parquet`` beside the predictions (the run
    dir, or its ``in_sample/``)."""
    table, boxes = issues_for_run(run, in_sample=in_sample, calibrate=calibrate)
    if write:
        folder = run.run_dir / IN_SAMPLE_DIR if in_sample else run.run_dir
        write_label_issues(folder, table)
        write_box_issues(folder, boxes)
    return table


def issues_for_run(
    run: FinishedRun, *, in_sample: bool = False, calibrate: bool = CALIBRATE_DEFAULT,
) -> tuple[pa.Table, pa.Table]:
    """Rank a finished run's out-of-fold (or, with ``in_sample``, in-sample) predictions: (the
    images, the boxes), each worst first (`rank_issues`). ``calibrate``: see `rank_label_issues`."""
    folder = run.run_dir / IN_SAMPLE_DIR if in_sample else run.run_dir
    path = folder / PREDICTIONS
    if not path.is_file():
        raise ConfigError(f"{folder}: no {PREDICTIONS} (in-sample predictions need "
                          "run_cv(..., in_sample=True))")
    import pyarrow.parquet as pq

    folds = np.zeros_like(run.fold_of_image) if in_sample else run.fold_of_image  # one model: "fold" 0
    losses_path = folder / _rundir.BOX_LOSSES_PARQUET
    losses = pq.read_table(losses_path) if losses_path.is_file() else None
    # Calibration is cross-fitted over the fold plan's images even in-sample (one model): an
    # image's own labels never fit the map that calibrates its scores.
    return rank_issues(run.dataset, pq.read_table(path), fold_of_image=folds,
                       box_losses=losses, calibrate=calibrate,
                       calibration_groups=run.fold_of_image)


def rank_label_issues(
    dataset: CocoDataset, predictions: pa.Table, *, fold_of_image: np.ndarray | None = None,
    box_losses: pa.Table | None = None, calibrate: bool = CALIBRATE_DEFAULT,
    calibration_groups: np.ndarray | None = None,
) -> pa.Table:
    """The per-image ranking of `rank_issues` (see there)."""
    return rank_issues(dataset, predictions, fold_of_image=fold_of_image, box_losses=box_losses,
                       calibrate=calibrate, calibration_groups=calibration_groups)[0]


def rank_issues(
    dataset: CocoDataset, predictions: pa.Table, *, fold_of_image: np.ndarray | None = None,
    box_losses: pa.Table | None = None, calibrate: bool = CALIBRATE_DEFAULT,
    calibration_groups: np.ndarray | None = None,
) -> tuple[pa.Table, pa.Table]:
    """Score every image with cleanlab, once over the whole table, rank the images worst first,
    and rank every given box and unmatched prediction (`kfold_ray.report._box_issues`).

    Args:
        dataset: the labels (crowd boxes are left out, as in the cleanlab labels kfold-ray writes).
        predictions: detections with the ``predictions.parquet`` columns (DETECTION_SCHEMA):
            ``image_index``, ``class_index``, absolute ``x1, y1, x2, y2``, ``score``; out-of-fold or
            in-sample. Images without a row have no detection.
        fold_of_image: int (N,) fold that predicted each image; default: from the table's ``fold``
            column (-1 for an image without detections).
        box_losses: ``box_losses.parquet`` of the run (``image_index``, ``annotation_id`` or
            ``ann_row``, ``loss_cls``, ``loss_box_reg``, ``p_given``, ``p_background``), for the
            loss-inspection columns and issue kinds; None leaves those columns null.
        calibrate: score with cross-fitted per-class calibrated scores (`kfold_ray.report._calibrate`)
            instead of the raw ones; the raw scores stay in ``boxes`` (``score``).
        calibration_groups: int (N,) cross-fitting group of each image (default: its fold).

    Returns:
        (images, boxes): pyarrow Tables with `LABEL_ISSUE_COLUMNS` and `BOX_ISSUE_COLUMNS`,
        each sorted by ``rank`` (1 = worst).
    """
    from .._schema import DETECTION_SCHEMA

    missing = [n for n in ("image_index", "class_index", "x1", "y1", "x2", "y2", "score")
               if n not in predictions.column_names]
    if missing:
        raise ValueError(f"prediction table lacks columns {missing} (expected {DETECTION_SCHEMA.names})")
    if fold_of_image is not None:
        fold_of_image = np.asarray(fold_of_image, dtype=np.int64)
        if fold_of_image.shape != (dataset.num_images,):
            raise ValueError(f"fold_of_image has shape {fold_of_image.shape}, "
                             f"expected ({dataset.num_images},)")
    if dataset.num_images == 0:
        raise ValueError("the dataset has no images to rank")
    if calibration_groups is not None:
        calibration_groups = np.asarray(calibration_groups, dtype=np.int64)
        if calibration_groups.shape != (dataset.num_images,):
            raise ValueError(f"calibration_groups has shape {calibration_groups.shape}, "
                             f"expected ({dataset.num_images},)")
    return _rank(dataset, predictions, fold_of_image, box_losses, calibrate, calibration_groups)


def _rank(dataset: CocoDataset, table: pa.Table, fold_of_image: np.ndarray | None,
          box_losses: pa.Table | None = None, calibrate: bool = False,
          calibration_groups: np.ndarray | None = None) -> tuple[pa.Table, pa.Table]:
    if fold_of_image is None:
        fold_of_image = _fold_from_table(table, dataset.num_images)
    flat = flatten(dataset, table)
    probs = flat.p_score
    if calibrate:
        probs = _calibrated(flat, fold_of_image if calibration_groups is None else calibration_groups)
    # One pass over every (given box, prediction) pair gives cleanlab's scores and the box
    # signals alike (cleanlab's own functions rebuild their inputs in Python loops over box
    # pairs and start process pools: _objectlab.py, _scores.py).
    stats = pair_stats(flat, probs)
    pooled, quality, is_issue = cleanlab_scores(flat, probs, stats, dataset.num_classes)
    signals = _loss_signals(flat, stats, box_losses)
    terms = given_box_terms(dataset, box_losses)
    _note_missing(box_losses, terms)
    box_table, worst = rank_boxes(dataset, box_signals(flat, stats, terms), fold_of_image)
    signals["box_score"] = worst.score if box_losses is not None else np.full(dataset.num_images, np.nan)
    boxes = image_records(box_table, dataset.num_images, dataset.class_names)
    # Worst first. With the fold models' box losses, by IMAGE_ORDER_SIGNAL (it finds errors
    # where cleanlab's thresholds see nothing: benchmarks/README.md), cleanlab's quality breaking
    # ties; else by quality alone. Ties keep dataset order.
    if box_losses is not None:
        order = np.lexsort((quality, -signals[IMAGE_ORDER_SIGNAL]))
    else:
        order = np.argsort(quality, kind="stable")
    rank = np.empty(dataset.num_images, dtype=np.int32)
    rank[order] = np.arange(1, dataset.num_images + 1, dtype=np.int32)
    columns = {
        "rank": rank, "image_index": np.arange(dataset.num_images, dtype=np.int64),
        "image_id": dataset.image_ids.astype(np.int64), "file_name": list(dataset.file_names),
        "fold": fold_of_image.astype(np.int32), "quality_score": quality, "is_issue": is_issue,
        "issue_kind": worst.kind, "overlooked_score": pooled["overlooked"],
        "swap_score": pooled["swapped"], "badloc_score": pooled["badly_located"],
        "num_given": np.diff(flat.g_start).astype(np.int32),
        "num_predicted": np.diff(flat.p_start).astype(np.int32), "boxes": boxes,
        **signals, "named": worst.named,
    }
    # from_pandas: a signal that could not be computed (NaN) is a null, not a number.
    out = pa.table({name: pa.array(columns[name], type=LABEL_ISSUE_SCHEMA.field(name).type,
                                   from_pandas=name in _SIGNAL_COLUMNS)
                    for name in LABEL_ISSUE_COLUMNS}, schema=LABEL_ISSUE_SCHEMA)
    return out.take(pa.array(order)), box_table


def _calibrated(flat: FlatBoxes, groups: np.ndarray) -> np.ndarray:
    """Cross-fitted per-class calibrated scores (`kfold_ray.report._calibrate`) of every
    prediction: right = it overlaps a given box of its class with IoU >= MATCH_IOU."""
    from ._calibrate import MATCH_IOU, cross_fitted_scores

    best = np.full(flat.p_image.size, -1.0)
    for c in pair_chunks(flat):
        same = flat.g_class[c.g] == flat.p_class[c.p]
        np.maximum.at(best, c.p[same], c.iou[same])
    groups = np.asarray(groups, dtype=np.int64)[flat.p_image]
    return cross_fitted_scores(flat.p_score, flat.p_class, best >= MATCH_IOU, groups)


def _note_missing(box_losses: pa.Table | None, terms: dict[str, np.ndarray]) -> None:
    """One line when the run lacks some per-box signals (an older run, or a detector without)."""
    import logging

    log = logging.getLogger("kfold_ray.report")
    if box_losses is None:
        log.warning("the run has no box_losses.parquet (a detector without per-box signals, or "
                    "an older run): images are ranked by cleanlab's quality score, and the "
                    "per-box ranking reads the predictions only")
        return
    missing = [t for t in ("p_other", "refined_iou") if t not in terms
               or np.isnan(terms[t]).all()]
    if missing:
        log.warning("box_losses.parquet has no %s (written by an older kfold-ray): swapped "
                    "classes are ranked by 1 - p_given - p_background against p_given, and "
                    "box locations by the best prediction's IoU", ", ".join(missing))


def _loss_signals(flat: FlatBoxes, stats: PairStats, box_losses: pa.Table | None
                  ) -> dict[str, np.ndarray]:
    """Per image, the signals that do not need a confident detector (benchmarks/README.md:
    together they found the example's injected errors with AUROC 0.946 where cleanlab's quality
    score reached 0.551):

        loss_score       max over the given boxes of ``loss_cls + loss_box_reg``, from the model
                         that held the image out (swapped classes, shifted boxes); null without losses
        unmatched_score  best score of a prediction overlapping no given box (IoU < 0.5): an
                         object nobody labelled (missing boxes)
        combined_score   the larger of the two, each as its rank fraction over the dataset in
                         [0, 1] (no weights to tune); null without losses
    """
    n = flat.num_images
    unmatched = np.zeros(n, dtype=np.float64)
    free = stats.best_iou < UNMATCHED_IOU
    np.maximum.at(unmatched, flat.p_image[free], flat.p_score[free])
    loss = np.full(n, np.nan)
    if box_losses is not None:
        loss[:] = 0.0  # an image without given boxes has nothing to lose
        images = box_losses.column("image_index").to_numpy()
        total = (box_losses.column("loss_cls").to_numpy().astype(np.float64)
                 + box_losses.column("loss_box_reg").to_numpy().astype(np.float64))
        np.maximum.at(loss, images, total)
    combined = (np.maximum(rank_fraction(loss), rank_fraction(unmatched))
                if box_losses is not None else loss)
    return {"loss_score": loss, "unmatched_score": unmatched, "combined_score": combined}


def rank_fraction(x: np.ndarray) -> np.ndarray:
    """Each value's rank among ``x`` as a fraction in [0, 1] (ties share their mean rank)."""
    from scipy.stats import rankdata

    return (rankdata(x) - 1) / max(len(x) - 1, 1)


def _fold_from_table(table: pa.Table, num_images: int) -> np.ndarray:
    fold = np.full(num_images, -1, dtype=np.int64)
    if "fold" in table.column_names and table.num_rows:
        img = table.column("image_index").to_numpy().astype(np.int64)
        fold[img] = table.column("fold").to_numpy().astype(np.int64)
    return fold


# ---- files -------------------------------------------------------------------------------------------
def write_label_issues(folder: str | os.PathLike[str], table: pa.Table) -> tuple[Path, Path]:
    """Write ``label_issues.parquet`` and ``label_issues.csv`` into ``folder``, each atomically."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    folder = Path(folder)
    parquet, csv = folder / LABEL_ISSUES_PARQUET, folder / LABEL_ISSUES_CSV
    with atomic_path(parquet) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    with atomic_path(csv) as tmp:
        pacsv.write_csv(table, tmp)
    return parquet, csv
