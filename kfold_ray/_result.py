"""What a finished run hands back: `CVResult` (from `run_cv`, or `open_run` on a run dir), its
rankings per image and per box (written into the run dir as they are computed), and
`report_run`, the ranking, the page and the score against known injected errors.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ._exceptions import ConfigError
from .data._dataset import CocoDataset
from .data._fold_plan import FoldPlan
from .report._box_issues import write_box_issues
from .report._finished_run import FinishedRun, read_finished_run, synced_run_dir
from .report._injected import injected_errors_of, read_injected_errors, score_against_injected
from .report._page import write_report
from .report._rank import CALIBRATE_DEFAULT, issues_for_run, write_label_issues
from .review._suspects import with_image_paths
from .run import _state
from .storage import _rundir
from .storage._storage import Storage


@dataclass
class CVResult:
    """The outputs of a finished run (all of them also lie in ``run_dir``).

    Attributes:
        run_dir: the run's folder: a Path for a local run dir, else its URI (``s3://...``).
        dataset: the dataset the run was made on.
        plan: the fold plan (``plan.fold_of_image``).
        metrics: per-fold and pooled out-of-fold COCO AP (as in ``metrics.json``).
    """

    run_dir: Path | str
    dataset: CocoDataset
    plan: FoldPlan
    metrics: dict[str, Any]
    _predictions: list | None = field(default=None, repr=False)

    @property
    def storage(self) -> Storage:
        """The run dir as a `Storage` (local or remote, the same calls)."""
        return Storage(str(self.run_dir))

    @property
    def image_ids(self) -> np.ndarray:
        """int64 (N,) COCO image ids in dataset order (the order of every per-image output)."""
        return self.dataset.image_ids

    @property
    def fold_of_image(self) -> np.ndarray:
        """int64 (N,) fold that held each image out (its prediction comes from that fold's model)."""
        return self.plan.fold_of_image

    @property
    def predictions(self) -> list[list[np.ndarray]]:
        """cleanlab object-detection predictions: per image, per class index, float32 (n, 5)
        ``[x1, y1, x2, y2, score]``."""
        if self._predictions is None:
            # Our own file, written by this run.
            self._predictions = pickle.loads(self.storage.read_bytes(_rundir.CLEANLAB_PREDICTIONS))
        return self._predictions

    @property
    def labels(self) -> list[dict[str, np.ndarray]]:
        """cleanlab object-detection labels: per image ``{"bboxes": float32 (L, 4), "labels": int (L,)}``."""
        return self.dataset.cleanlab_labels()

    def table(self):
        """All out-of-fold detections as a pyarrow Table (``predictions.parquet``)."""
        import pyarrow.parquet as pq

        return pq.read_table(self.storage.open_input_file(_rundir.PREDICTIONS_PARQUET))

    def output_files(self) -> list[str]:
        """Where the run's main outputs are (paths or URIs), in the order the CLI lists them."""
        return [self.storage.uri_of(name) for name in _rundir.OUTPUT_FILES]

    def label_issues(self, top: int | None = None, *, in_sample: bool = False,
                     calibrate: bool | None = None):
        """Images ranked by how likely their labels are wrong (scored once over all images).

        Writes ``label_issues.parquet``, ``label_issues.csv`` and ``box_issues.parquet`` into the
        run dir (with ``in_sample``: into ``in_sample/``, from the in-sample baseline's predictions).

        Args:
            top: keep only the ``top`` worst images (default: all).
            in_sample: rank the in-sample predictions (``run_cv(..., in_sample=True)``) instead.
            calibrate: score with cross-fitted calibrated detection scores (default:
                ``kfold_ray.report._rank.CALIBRATE_DEFAULT``; see `kfold_ray.report._calibrate`).

        Returns:
            A pandas DataFrame, worst first, one row per image: ``rank``, ``image_id``,
            ``file_name``, ``image_path`` (the image's resolved path or URI), ``fold``,
            ``box_score`` (the order), ``issue_kind`` (swapped / badly_located / spurious /
            overlooked), ``named``, cleanlab's ``quality_score`` and ``is_issue``, the boxes
            concerned (``boxes``, JSON), ... (see `kfold_ray.report._rank`).
        """
        images, _ = self._rank(top, in_sample=in_sample, calibrate=calibrate)
        return (images if top is None else images.slice(0, top)).to_pandas()

    def box_issues(self, top: int | None = None, *, in_sample: bool = False,
                   calibrate: bool | None = None):
        """Every given box and every unmatched prediction, ranked by how likely it is wrong,
        with its kind (swapped / badly_located / spurious / overlooked), score and signals.

        Ranks the run as `label_issues` does and writes the same files (see
        `kfold_ray.report._box_issues` for the columns).

        Returns:
            A pandas DataFrame, worst first (``top``: only the ``top`` worst rows).
        """
        _, boxes = self._rank(top, in_sample=in_sample, calibrate=calibrate)
        return (boxes if top is None else boxes.slice(0, top)).to_pandas()

    def _rank(self, top: int | None, *, in_sample: bool, calibrate: bool | None):
        if top is not None and (isinstance(top, bool) or not isinstance(top, int) or top < 0):
            raise ConfigError(f"top must be None or an integer >= 0, got {top!r}")
        with synced_run_dir(self.storage) as local:
            run = read_finished_run(local, dataset=self.dataset)
            return rank_and_write(run, local, in_sample=in_sample,
                                  calibrate=CALIBRATE_DEFAULT if calibrate is None else calibrate)


def rank_and_write(run: FinishedRun, local: Path, *, in_sample: bool = False,
                   calibrate: bool = CALIBRATE_DEFAULT):
    """Rank a finished run (its local copy ``local``) per image and per box, give each image its
    resolved path, and write ``label_issues.parquet``/``.csv`` and ``box_issues.parquet``
    (into ``in_sample/`` with ``in_sample``). Returns (images, boxes) as pyarrow Tables."""
    images, boxes = issues_for_run(run, in_sample=in_sample, calibrate=calibrate)
    images = with_image_paths(images, run.dataset)
    folder = local / _rundir.IN_SAMPLE if in_sample else local
    write_label_issues(folder, images)
    write_box_issues(folder, boxes)
    return images, boxes


def open_run(run_dir: str | os.PathLike[str], *, annotations: str | os.PathLike[str] | None = None,
             image_root: str | os.PathLike[str] | None = None) -> CVResult:
    """The `CVResult` of a finished run dir (made by `run_cv`, ``kfold-ray run`` or ``ray job
    submit``): the same object `run_cv` returned.

    Args:
        run_dir: the run's folder, a path or a URI (``s3://bucket/runs/run1``).
        annotations: the COCO json, when it has moved since the run (default: where the run
            read it, as ``config.json`` records).
        image_root: the images' folder, when it has moved (default: the recorded one).

    Raises ConfigError when ``run_dir`` holds no finished run, DatasetError when the dataset
    is gone or differs from the run's (its fingerprint: the json's bytes, the images' names
    and sizes).
    """
    storage = Storage(str(run_dir))
    dataset, plan, metrics = _state.open_finished(
        storage, annotations=None if annotations is None else os.fspath(annotations),
        image_root=None if image_root is None else os.fspath(image_root))
    return CVResult(run_dir=storage.local_root if storage.is_local else storage.uri,
                    dataset=dataset, plan=plan, metrics=metrics)


@dataclass(frozen=True)
class RunReport:
    """What `report_run` ranked and wrote.

    Attributes:
        rankings: ``"out_of_fold"`` (and ``"in_sample"`` when the run has it): label-issue
            tables, worst first (`kfold_ray.report._rank`).
        injected: how the out-of-fold ranking finds the dataset's known errors
            (`kfold_ray.report._injected.score_against_injected`; ``n`` is 0 when it lists none).
        files: where ``label_issues.csv``, ``label_issues.parquet``, ``box_issues.parquet`` and
            the page went (the page last).
    """

    rankings: dict[str, Any]
    injected: dict[str, Any]
    files: tuple[str, ...]


def report_run(run_dir: str | os.PathLike[str], *, top: int = 20, calibrate: bool | None = None,
               dataset: CocoDataset | None = None,
               injected_errors: str | os.PathLike[str] | None = None) -> RunReport:
    """Rank a finished run's images (out-of-fold, and in-sample when it has them), write the
    label-issue tables and the report page into it, and score the ranking against the dataset's
    injected errors (``injected_errors``, else the file beside its annotations, if any)."""
    if isinstance(top, bool) or not isinstance(top, int) or top < 0:
        raise ConfigError(f"--top must be an integer >= 0, got {top!r}")
    calibrate = CALIBRATE_DEFAULT if calibrate is None else calibrate
    storage = Storage(str(run_dir))
    with synced_run_dir(storage) as local:
        run = read_finished_run(local, dataset=dataset)
        rankings = {"out_of_fold": rank_and_write(run, local, calibrate=calibrate)[0]}
        if run.has_in_sample:
            rankings["in_sample"] = rank_and_write(run, local, in_sample=True, calibrate=calibrate)[0]
        page = write_report(run, rankings, top=top)
    known = (read_injected_errors(str(injected_errors)) if injected_errors is not None
             else injected_errors_of(run.dataset))
    files = (_rundir.LABEL_ISSUES_CSV, _rundir.LABEL_ISSUES_PARQUET, _rundir.BOX_ISSUES_PARQUET,
             page.relative_to(local).as_posix())
    return RunReport(rankings=rankings,
                     injected=score_against_injected(rankings["out_of_fold"], known or []),
                     files=tuple(storage.uri_of(name) for name in files))
