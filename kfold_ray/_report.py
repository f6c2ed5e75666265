"""Stage "report", part 1: rank the images by how likely their labels are wrong.

cleanlab's object-detection scoring runs ONCE over the whole stitched prediction table (its
per-class thresholds depend on the whole dataset, cleanlab #1301), never per fold, in one process
with cleanlab's formulas (`kfold_ray._objectlab`: cleanlab's own functions take hours at COCO
scale; tests check both give the same numbers):

    quality_score   as ``cleanlab.object_detection.rank.get_label_quality_scores`` (1 = clean)
    is_issue        as ``cleanlab.object_detection.filter.find_label_issues``
    subtype scores  cleanlab's per-box scores (as ``rank.compute_overlooked_box_scores``,
                    ``compute_swap_box_scores``, ``compute_badloc_box_scores``), pooled per image
                    with ``rank.pool_box_scores_per_image``; the quality score is their weighted
                    geometric mean

With ``calibrate``, cleanlab scores cross-fitted per-class calibrated detection scores
(`kfold_ray._calibrate`); the raw ones stay in ``boxes``. The three subtypes say which kind of
problem is most likely, and on which boxes:

    overlooked      a confident prediction (score >= 0.95) overlapping no given box: an object
                    nobody labelled (per predicted box)
    swapped         a given box sits where a confident prediction of another class is (per given box)
    badly_located   a given box overlaps its best same-class prediction (score > 0.5) only a little
                    (per given box)

When the run has box losses, the kind comes from the loss signals instead (`kfold_ray._issue_kinds`).

cleanlab's inputs are built in memory from the prediction table and the dataset reloaded from the
run's ``config.json`` (pickles from a run dir are never loaded: unpickling a file from someone
else's run dir could run code). Images without annotations get a score like any other (cleanlab
#1234 crashed on them when their boxes had shape (0,); ours are float32 (0, 4)).

Columns of ``label_issues.parquet`` / ``.csv`` (`LABEL_ISSUE_COLUMNS`), one row per image, worst first:

    rank            int32   1 = most likely mislabelled: by combined_score when the run has box
                            losses (Faster/Mask R-CNN folds), else by cleanlab's quality_score
    image_index     int64   position of the image in the dataset (json order)
    image_id        int64   COCO image id
    file_name       string  as in the json
    fold            int32   fold whose model predicted the image (-1 if unknown)
    quality_score   float64 cleanlab's label quality score in [0, 1]
    is_issue        bool    cleanlab flags the image (``find_label_issues``)
    issue_kind      string  overlooked | swapped | badly_located | "" (no sign of a problem):
                            from the box losses when the run has them (`kfold_ray._issue_kinds`), else
                            from cleanlab's subtype scores
    overlooked_score, swap_score, badloc_score  float64 pooled subtype scores (1 = no sign of it)
    num_given       int32   given (non-crowd) boxes
    num_predicted   int32   predicted boxes
    boxes           string  JSON list of the boxes concerned, worst first (see `_issue_kinds._record`)
    loss_score, unmatched_score, combined_score  float64  out-of-fold loss inspection and
                    unmatched confident predictions, and their combination (see `_loss_signals`);
                    higher = more likely wrong
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import pyarrow as pa

from . import _rundir
from ._atomic import atomic_path
from ._exceptions import ConfigError, DatasetError, KfoldRayError
from ._issue_kinds import LOSS_TERMS, UNMATCHED_IOU, explain_images, rank_fraction, raw_probs
from ._objectlab import auxiliary_inputs
from ._storage import Storage

if TYPE_CHECKING:
    from ._dataset import CocoDataset

__all__ = [
    "CALIBRATE_DEFAULT",
    "INJECTED_ERRORS",
    "LABEL_ISSUE_COLUMNS",
    "FinishedRun",
    "injected_errors_of",
    "label_issues_for_run",
    "open_run",
    "rank_label_issues",
    "read_injected_errors",
    "score_against_injected",
    "write_label_issues",
]

LABEL_ISSUES_PARQUET = _rundir.LABEL_ISSUES_PARQUET
LABEL_ISSUES_CSV = _rundir.LABEL_ISSUES_CSV
IN_SAMPLE_DIR = _rundir.IN_SAMPLE
PREDICTIONS = _rundir.PREDICTIONS_PARQUET
# What the report reads of a run dir (copied down first when the run dir is in an object store).
_REPORT_INPUTS = (_rundir.RUN_STATE, _rundir.CONFIG, _rundir.METRICS, _rundir.FOLD_PLAN, PREDICTIONS,
                  f"{IN_SAMPLE_DIR}/{PREDICTIONS}", _rundir.BOX_LOSSES_PARQUET,
                  f"{IN_SAMPLE_DIR}/{_rundir.BOX_LOSSES_PARQUET}")
#: Whether the ranking calibrates scores by default (`kfold_ray._calibrate`). Off: on the example
#: (benchmarks/README.md, "Finding label errors") it lifts cleanlab's AUROC (0.55 -> 0.70 at 150
#: iterations, 0.59 -> 0.68 at 300) but leaves the default order (combined_score) as it was, and
#: for a confident, accurate detector it hurts: fitted against labels with errors, a map cannot
#: exceed the labels' accuracy, so 0.99 becomes ~0.9, under cleanlab's 0.95 threshold, and the
#: errors it found before are missed (tests/test_calibrate.py).
CALIBRATE_DEFAULT = False
_SIGNAL_COLUMNS = ("loss_score", "unmatched_score", "combined_score")


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
])
LABEL_ISSUE_COLUMNS: tuple[str, ...] = tuple(LABEL_ISSUE_SCHEMA.names)


# ---- a run dir anywhere ------------------------------------------------------------------------
@contextlib.contextmanager
def synced_run_dir(location: Storage | str | os.PathLike[str]) -> Iterator[Path]:
    """A local folder holding the run dir: itself when local; else a copy of what the report
    reads, whose new or changed files (rankings, the page) are uploaded back on clean exit."""
    storage = location if isinstance(location, Storage) else Storage(location)
    if storage.is_local:
        yield Path(storage.root)
        return
    if not storage.is_file(_rundir.RUN_STATE):
        raise ConfigError(f"{storage.uri}: not a kfold-ray run dir (no {_rundir.RUN_STATE})")
    with tempfile.TemporaryDirectory(prefix="kfold-ray-report-") as d:
        local = Path(d) / storage.name
        for name in _REPORT_INPUTS:
            if storage.is_file(name):
                storage.get_file(name, local / name)
        before = _snapshot(local)
        yield local
        for rel, stamp in sorted(_snapshot(local).items()):
            if before.get(rel) != stamp:
                storage.put_file(local / rel, rel)


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.relative_to(folder).as_posix(): (p.stat().st_mtime_ns, p.stat().st_size)
            for p in folder.rglob("*") if p.is_file()}


# ---- a finished run ----------------------------------------------------------------------------
@dataclass(frozen=True)
class FinishedRun:
    """What the report needs of a finished run dir (all read from its JSON files).

    Attributes:
        run_dir: the run's folder.
        dataset: the dataset, reloaded from ``config.json``'s annotations and image root.
        config: ``config.json`` as a dict.
        metrics: ``metrics.json`` as a dict.
        state: ``run.json`` as a dict.
        fold_of_image: int64 (N,) fold that held out each image (``folds.json``).
    """

    run_dir: Path
    dataset: CocoDataset
    config: dict[str, Any]
    metrics: dict[str, Any]
    state: dict[str, Any]
    fold_of_image: np.ndarray

    @property
    def has_in_sample(self) -> bool:
        return (self.run_dir / IN_SAMPLE_DIR / PREDICTIONS).is_file()


def open_run(run_dir: str | os.PathLike[str], *, dataset: CocoDataset | None = None) -> FinishedRun:
    """Open a finished run dir; reload its dataset (or check that ``dataset`` is the run's).

    Raises:
        ConfigError: ``run_dir`` is not a finished kfold-ray run (no ``run.json``, not finished,
            or a file the report needs is missing or unreadable).
        DatasetError: the annotations or images are gone, or changed since the run.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir}: no such run dir")
    state = _read_json(run_dir / "run.json", run_dir)
    if state.get("status") != "finished":
        raise ConfigError(f"{run_dir}: the run is not finished (status {state.get('status')!r}); "
                          "finish it with `kfold-ray run ... --resume` first")
    config = _read_json(run_dir / "config.json", run_dir)
    metrics = _read_json(run_dir / "metrics.json", run_dir)
    if not (run_dir / PREDICTIONS).is_file():
        raise ConfigError(f"{run_dir}: {PREDICTIONS} is missing; not a finished kfold-ray run")
    if dataset is None:
        from ._dataset import load_coco

        try:
            annotations, image_root = config["annotations"], config["image_root"]
        except (KeyError, TypeError):
            raise ConfigError(f"{run_dir / 'config.json'}: no annotations/image_root recorded") from None
        # A run that left unreadable images out must leave the same ones out again (which needs
        # the images looked at); else the files only need to exist.
        excluded = bool(config.get("exclude_unreadable"))
        dataset = load_coco(annotations, image_root, check_images=excluded,
                            exclude_unreadable=excluded)
    expected = config.get("dataset_fingerprint")
    if expected and dataset.fingerprint != expected:
        raise DatasetError(
            f"the dataset changed since the run (fingerprint {dataset.fingerprint[:12]}, the run "
            f"used {str(expected)[:12]}): its predictions no longer line up with the labels",
            path=str(dataset.annotations_path),
        )
    from ._folds import FoldPlan

    try:
        fold_of_image = FoldPlan.load(run_dir / "folds.json").fold_of_image
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"{run_dir / 'folds.json'}: unreadable fold plan ({e})") from e
    return FinishedRun(run_dir=run_dir, dataset=dataset, config=config, metrics=metrics,
                       state=state, fold_of_image=np.asarray(fold_of_image, dtype=np.int64))


def _read_json(path: Path, run_dir: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{run_dir}: not a kfold-ray run dir (no {path.name})") from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: unreadable ({e})") from e
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: not a JSON object")
    return doc


# ---- the ranking ---------------------------------------------------------------------------------
def label_issues_for_run(
    run: FinishedRun, *, in_sample: bool = False, write: bool = True,
    calibrate: bool = CALIBRATE_DEFAULT,
) -> pa.Table:
    """Rank a finished run's out-of-fold (or, with ``in_sample``, in-sample) predictions.

    With ``write``, also writes ``label_issues.parquet`` and ``label_issues.csv`` beside the
    predictions (the run dir, or its ``in_sample/``). ``calibrate``: see `rank_label_issues`.
    """
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
    table = rank_label_issues(run.dataset, pq.read_table(path), fold_of_image=folds,
                              box_losses=losses, calibrate=calibrate,
                              calibration_groups=run.fold_of_image)
    if write:
        write_label_issues(folder, table)
    return table


def rank_label_issues(
    dataset: CocoDataset, predictions: pa.Table, *, fold_of_image: np.ndarray | None = None,
    box_losses: pa.Table | None = None, calibrate: bool = CALIBRATE_DEFAULT,
    calibration_groups: np.ndarray | None = None,
) -> pa.Table:
    """Score every image with cleanlab, once over the whole table, and rank them worst first.

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
        calibrate: score with cross-fitted per-class calibrated scores (`kfold_ray._calibrate`)
            instead of the raw ones; the raw scores stay in ``boxes`` (``score``).
        calibration_groups: int (N,) cross-fitting group of each image (default: its fold).

    Returns:
        A pyarrow Table with `LABEL_ISSUE_COLUMNS`, sorted by ``rank`` (1 = worst).
    """
    from ._schema import DETECTION_SCHEMA

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
          calibration_groups: np.ndarray | None = None) -> pa.Table:
    from cleanlab.object_detection import rank as cl_rank

    from ._objectlab import box_scores, find_label_issues, label_quality_scores
    from ._outputs import cleanlab_predictions

    if fold_of_image is None:
        fold_of_image = _fold_from_table(table, dataset.num_images)
    predictions = cleanlab_predictions(table, num_images=dataset.num_images,
                                       num_classes=dataset.num_classes)
    aux = auxiliary_inputs(dataset.cleanlab_labels(), predictions)
    if calibrate:
        from ._calibrate import calibrate_scores

        calibrate_scores(aux, fold_of_image if calibration_groups is None else calibration_groups)
    # cleanlab's scores and flags from the auxiliary inputs built once (cleanlab's own functions
    # rebuild them, in Python loops over box pairs, and start process pools: _objectlab.py).
    per_box = box_scores(aux)
    pooled = {kind: np.asarray(cl_rank.pool_box_scores_per_image(scores), dtype=np.float64)
              for kind, scores in per_box.items()}
    quality = label_quality_scores(pooled)
    is_issue = find_label_issues(aux, per_box, dataset.num_classes)
    losses = _losses_per_box(dataset, box_losses) if box_losses is not None else None
    signals = _loss_signals(dataset.num_images, aux, box_losses)
    kinds, boxes = explain_images(dataset, aux, per_box, pooled, is_issue, losses, signals)
    # Worst first. With the fold models' box losses, by the combined loss/unmatched signal (it
    # finds errors where cleanlab's thresholds see nothing: benchmarks/README.md), cleanlab's
    # quality breaking ties; else by quality alone. Ties keep dataset order.
    if box_losses is not None:
        order = np.lexsort((quality, -signals["combined_score"]))
    else:
        order = np.argsort(quality, kind="stable")
    rank = np.empty(dataset.num_images, dtype=np.int32)
    rank[order] = np.arange(1, dataset.num_images + 1, dtype=np.int32)
    n_given = np.array([len(a["lab_labels"]) for a in aux], dtype=np.int32)
    n_pred = np.array([len(a["pred_labels"]) for a in aux], dtype=np.int32)
    columns = {
        "rank": rank, "image_index": np.arange(dataset.num_images, dtype=np.int64),
        "image_id": dataset.image_ids.astype(np.int64), "file_name": list(dataset.file_names),
        "fold": fold_of_image.astype(np.int32), "quality_score": quality, "is_issue": is_issue,
        "issue_kind": kinds, "overlooked_score": pooled["overlooked"],
        "swap_score": pooled["swapped"], "badloc_score": pooled["badly_located"],
        "num_given": n_given, "num_predicted": n_pred, "boxes": boxes,
        **signals,
    }
    # from_pandas: a signal that could not be computed (NaN) is a null, not a number.
    out = pa.table({name: pa.array(columns[name], type=LABEL_ISSUE_SCHEMA.field(name).type,
                                   from_pandas=name in _SIGNAL_COLUMNS)
                    for name in LABEL_ISSUE_COLUMNS}, schema=LABEL_ISSUE_SCHEMA)
    return out.take(pa.array(order))


def _loss_signals(n: int, aux: list[dict[str, Any]], box_losses: pa.Table | None
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

    unmatched = np.zeros(n, dtype=np.float64)
    for i, a in enumerate(aux):
        probs = raw_probs(a)
        if probs.size:
            iou = a["iou_matrix"]
            free = np.ones(probs.size, dtype=bool) if iou.shape[0] == 0 else iou.max(axis=0) < UNMATCHED_IOU
            unmatched[i] = probs[free].max(initial=0.0)
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


def _losses_per_box(dataset: CocoDataset, box_losses: pa.Table) -> dict[str, np.ndarray]:
    """The loss terms (`LOSS_TERMS`) of every given (non-crowd) box, float64 (num kept boxes,),
    in the order of cleanlab's labels (image by image); NaN for a box without a row."""
    keep = ~np.asarray(dataset.iscrowd, dtype=bool)
    kept_before = np.concatenate([[0], np.cumsum(keep)])
    if "ann_row" in box_losses.column_names:
        rows = box_losses.column("ann_row").to_numpy().astype(np.int64)
    else:  # box_losses.parquet names the annotation by id; ids the dataset lacks are left out
        sorter = np.argsort(dataset.ann_ids, kind="stable")
        ids = box_losses.column("annotation_id").to_numpy().astype(np.int64)
        at = np.searchsorted(dataset.ann_ids, ids, sorter=sorter)
        found = at < len(sorter)
        found[found] = dataset.ann_ids[sorter[at[found]]] == ids[found]
        rows = sorter[at[found]]
        box_losses = box_losses.filter(pa.array(found))
    ok = keep[rows]
    out = {}
    for name in LOSS_TERMS:
        column = np.full(int(keep.sum()), np.nan)
        if name in box_losses.column_names:
            column[kept_before[rows[ok]]] = box_losses.column(name).to_numpy()[ok].astype(np.float64)
        out[name] = column
    return out


def _fold_from_table(table: pa.Table, num_images: int) -> np.ndarray:
    fold = np.full(num_images, -1, dtype=np.int64)
    if "fold" in table.column_names and table.num_rows:
        img = table.column("image_index").to_numpy().astype(np.int64)
        fold[img] = table.column("fold").to_numpy().astype(np.int64)
    return fold


# ---- known errors (the example's answer key) -----------------------------------------------------------
#: The file a dataset with known, injected label errors keeps beside its annotations
#: (`kfold_ray._example` writes one): a JSON list of records with at least ``image_id`` and ``kind``.
INJECTED_ERRORS = "injected_errors.json"


def read_injected_errors(location: str | os.PathLike[str]) -> list[dict[str, Any]] | None:
    """The injected errors listed in ``location`` (the file, or the folder holding
    `INJECTED_ERRORS`; a path or a URI), or None when there is no such file or it is not a
    list of records with an ``image_id``."""
    location = str(location)
    if not location.endswith(".json"):
        location = location.rstrip("/") + "/" + INJECTED_ERRORS
    folder, slash, name = location.rpartition("/")
    try:
        storage = Storage(folder or slash or ".", what="dataset folder")
        if not storage.is_file(name):
            return None
        doc = json.loads(storage.read_text(name))
    except (OSError, ValueError, KfoldRayError):  # no answer key to show: not an error
        return None
    if not isinstance(doc, list) or not all(isinstance(e, dict) and "image_id" in e for e in doc):
        return None
    return doc


def injected_errors_of(dataset: CocoDataset) -> list[dict[str, Any]] | None:
    """The injected errors recorded beside the dataset's annotations, or None."""
    return read_injected_errors(str(dataset.annotations_path).rsplit("/", 1)[0])


def score_against_injected(table: pa.Table, injected: list[dict[str, Any]]) -> dict[str, Any]:
    """How well a ranking (worst first) finds known errors: ``n`` images with an error,
    ``in_top_n`` of them among the n worst, ``precision`` (in_top_n / n), ``auroc`` of the rank
    (None when every image or none has an error), and ``image_ids`` of the erroneous images."""
    from sklearn.metrics import roc_auc_score

    bad = {int(e["image_id"]) for e in injected}
    ids = table.column("image_id").to_pylist()
    hit = np.array([i in bad for i in ids])
    n = int(hit.sum())
    found = int(hit[:n].sum())
    rank = table.column("rank").to_numpy()
    auroc = float(roc_auc_score(hit, -rank)) if 0 < n < len(ids) else None
    return {"n": n, "in_top_n": found, "precision": found / n if n else None, "auroc": auroc,
            "image_ids": bad}


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
