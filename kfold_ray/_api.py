"""The Python API: `run_cv`, the whole job in one call, and `CVResult`, what it hands back; and one
function for each other command of the CLI (`validate_dataset`, `example_data` + `run_example`,
`report_run`), so that the CLI only parses flags and prints.

Order of work (each step only after the one before succeeded):
    load + validate the dataset -> check options -> plan folds -> check the model config
    -> fetch MODEL.WEIGHTS once -> check the run's storage
    -> (nothing reserved or written before this line) -> run dir -> Ray -> folds stream
    -> stitch -> outputs -> metrics
"""

from __future__ import annotations

import logging
import os
import pickle
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Hashable, Mapping, Sequence

import numpy as np

from ._backend import FoldBackend
from ._config import DEFAULT_MODEL, CVConfig, FailureConfig, PredictConfig, TrainConfig
from ._exceptions import ConfigError
from .data._dataset import CocoDataset, load_coco
from .data._example import (
    EXAMPLE_MAX_ITER,
    EXAMPLE_MODEL,
    example_overrides,
    make_digits_example,
)
from .data._fold_plan import FoldPlan
from .data._split import make_fold_plan
from .report._rank import CALIBRATE_DEFAULT
from .run import _state
from .storage import _rundir
from .storage._storage import Storage, file_sha256

log = logging.getLogger(__name__)


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
        """Images ranked by how likely their labels are wrong (cleanlab, scored once over all images).

        Writes ``label_issues.parquet`` and ``label_issues.csv`` into the run dir (with
        ``in_sample``: into ``in_sample/``, from the in-sample baseline's predictions).

        Args:
            top: keep only the ``top`` worst images (default: all).
            in_sample: rank the in-sample predictions (``run_cv(..., in_sample=True)``) instead.
            calibrate: score with cross-fitted calibrated detection scores (default:
                ``kfold_ray.report._rank.CALIBRATE_DEFAULT``; see `kfold_ray.report._calibrate`).

        Returns:
            A pyarrow Table, worst first: ``rank``, ``image_id``, ``file_name``, ``quality_score``,
            ``is_issue``, ``issue_kind`` (overlooked / swapped / badly_located), the boxes
            concerned (``boxes``, JSON), ... (see `kfold_ray.report._rank`).
        """
        from .report._finished_run import open_run, synced_run_dir
        from .report._rank import label_issues_for_run

        if top is not None and (isinstance(top, bool) or not isinstance(top, int) or top < 0):
            raise ConfigError(f"top must be None or an integer >= 0, got {top!r}")
        with synced_run_dir(self.storage) as local:
            run = open_run(local, dataset=self.dataset)
            table = label_issues_for_run(run, in_sample=in_sample,
                                         calibrate=CALIBRATE_DEFAULT if calibrate is None else calibrate)
        return table if top is None else table.slice(0, top)

    def box_issues(self, top: int | None = None, *, in_sample: bool = False,
                   calibrate: bool | None = None):
        """Every given box and every unmatched prediction, ranked by how likely it is wrong,
        with its kind (swapped / badly_located / spurious / overlooked), score and signals.

        Ranks the run as `label_issues` does (and writes the same files, plus
        ``box_issues.parquet``; see `kfold_ray.report._box_issues` for the columns).

        Returns:
            A pandas DataFrame, worst first (``top``: only the ``top`` worst rows).
        """
        import pyarrow.parquet as pq

        from .report._finished_run import IN_SAMPLE_DIR, open_run, synced_run_dir
        from .report._rank import label_issues_for_run

        if top is not None and (isinstance(top, bool) or not isinstance(top, int) or top < 0):
            raise ConfigError(f"top must be None or an integer >= 0, got {top!r}")
        with synced_run_dir(self.storage) as local:
            run = open_run(local, dataset=self.dataset)
            label_issues_for_run(run, in_sample=in_sample,
                                 calibrate=CALIBRATE_DEFAULT if calibrate is None else calibrate)
            folder = local / IN_SAMPLE_DIR if in_sample else local
            table = pq.read_table(folder / _rundir.BOX_ISSUES_PARQUET)
        return (table if top is None else table.slice(0, top)).to_pandas()


def run_cv(
    dataset: CocoDataset | str | os.PathLike[str],
    k: int = 5,
    *,
    image_root: str | os.PathLike[str] | None = None,
    model: str = DEFAULT_MODEL,
    overrides: Sequence[str] | None = None,
    gpus_per_fold: float = 1.0,
    cpus_per_fold: float | None = None,
    workers_per_fold: int | None = None,
    split: str | Any = "kfold",
    groups: Mapping[int, Hashable] | Sequence[Hashable] | str | None = None,
    seed: int = 0,
    run_dir: str | os.PathLike[str] | None = None,
    score_threshold: float = 0.05,
    batch_size: int = 8,
    amp: bool = True,
    max_retries: int = 2,
    checkpoint_period: int | None = None,
    keep_checkpoints: int = 2,
    address: str | None = None,
    resume: bool = False,
    in_sample: bool = False,
    exclude_unreadable: bool = False,
    progress: bool = True,
    backend: FoldBackend | None = None,
) -> CVResult:
    """K-fold cross-validation of a Detectron2 detector: out-of-fold predictions for every image.

    Args:
        dataset: a loaded `CocoDataset`, or the path of a COCO annotations json.
        k: number of folds (2..number of images).
        image_root: folder of the images (default: the json's folder). Only with a path.
        model: Detectron2 model-zoo config name, YAML path, or preset (``tiny``).
        overrides: Detectron2 ``KEY VALUE`` overrides, flat, e.g. ``["SOLVER.MAX_ITER", "2000"]``.
        gpus_per_fold: GPUs per fold actor; fractional packs folds on one GPU. On a local
            cluster without GPUs, folds train on CPU.
        cpus_per_fold: CPUs per fold actor (its data-loading workers); default: its share of
            its node's CPUs per GPU, 1 per worker without GPUs.
        workers_per_fold: processes that train each fold data-parallel through Ray Train (DDP;
            gloo on CPU); ``SOLVER.IMS_PER_BATCH`` is their total batch. Default: the whole
            number of GPUs per fold (one GPU per worker), else 1.
        split: ``kfold``, ``group``, ``stratified`` or a scikit-learn splitter object.
        groups: for ``group``: image id -> group mapping, a sequence aligned to the images, or
            the name of an image field of the json.
        run_dir: where everything is written: a local folder or a URI (``s3://bucket/run``,
            ``gs://``, ``hdfs://``, ``file://``), which on a cluster every node must reach
            (default ``runs/<dataset>-<timestamp>``).
        resume: finish a run dir from an earlier, interrupted call (same dataset and config).
        address: Ray cluster: an address; ``"local"`` for a new local cluster; None (default):
            ``RAY_ADDRESS``, else the cluster running on this node, else a new local one.
        in_sample: also train once on all images and predict them (``in_sample/`` in the run
            dir): the baseline that shows what out-of-fold predictions gain.
        exclude_unreadable: leave images whose file is missing or corrupt out of the folds and
            of every output (listed with the reason in ``excluded_images.json``). Only with a
            path; a loaded dataset keeps what `load_coco` decided.
        backend: the fold backend (default: Detectron2).

    Returns:
        CVResult. Raises DatasetError/ConfigError/ResumeError (ValueErrors) on bad input before
        anything is written or reserved, FoldFailedError when a fold fails for good.
    """
    if not isinstance(dataset, CocoDataset):
        dataset = load_coco(dataset, image_root, exclude_unreadable=exclude_unreadable)
    elif image_root is not None or exclude_unreadable:
        raise ConfigError("image_root and exclude_unreadable are only used with a path to a COCO "
                          "json, not a loaded dataset (pass them to load_coco)")
    config = CVConfig(
        k=k, split=split if isinstance(split, str) else f"custom:{type(split).__name__}",
        seed=seed, gpus_per_fold=gpus_per_fold, cpus_per_fold=cpus_per_fold,
        workers_per_fold=workers_per_fold,
        train=TrainConfig(model=model, overrides=tuple(overrides or ()), amp=amp),
        predict=PredictConfig(batch_size=batch_size, score_threshold=score_threshold, amp=amp),
        failure=FailureConfig(max_retries=max_retries, checkpoint_period=checkpoint_period,
                              keep_checkpoints=keep_checkpoints),
    )
    plan = make_fold_plan(dataset, k, split=split, groups=groups, seed=seed)
    if backend is None:
        from .detectron2 import Detectron2Backend

        backend = Detectron2Backend()
    backend.validate(config.train, dataset, workers=config.workers)
    fetch = getattr(backend, "fetch_weights", None)
    weights_file = fetch(config.train) if fetch is not None else None
    describe = getattr(backend, "describe", None)
    model_config = describe(config.train, dataset) if describe is not None else ""
    storage = Storage(run_dir if run_dir is not None else _rundir.default_location(str(dataset.annotations_path)))
    storage.check_usable()
    weights_id = file_sha256(weights_file) if weights_file else ""
    fingerprint = _state.fingerprint(dataset, config, weights_id=weights_id,
                                      model_config=model_config)
    plan = _state.prepare(storage, dataset, config, plan, resume=resume, fingerprint=fingerprint,
                           model_config=model_config)
    weights = _store_weights(storage, weights_file, weights_id)
    return _run(dataset, config, plan, storage, backend, weights=weights, address=address,
                progress=progress, in_sample=in_sample)


def _store_weights(storage: Storage, local: Path | None, weights_id: str) -> str:
    """Put the fetched weights in the run's storage (once); return where folds load them from."""
    if local is None:
        return ""
    name = f"{_rundir.WEIGHTS}/{weights_id[:16]}-{local.name}"
    if not storage.is_file(name):
        storage.put_file(local, name)
    return storage.uri_of(name)


def _run(dataset: CocoDataset, config: CVConfig, plan: FoldPlan, storage: Storage,
         backend: FoldBackend, *, weights: str, address: str | None, progress: bool,
         in_sample: bool) -> CVResult:
    from .cluster._connect import connect
    from .cluster._plan import plan_launch
    from .outputs._metrics import coco_metrics
    started = time.time()
    info = connect(address)
    launch, lines = plan_launch(info, config, folds=plan.k)
    for line in lines:
        _say(line, progress)
    state = _state.read_state(storage)
    job = _job(storage, state["run_name"], config, weights, launch)
    table, losses, fold_info = _run_and_stitch(dataset, plan, job, backend, progress)
    _write_outputs(storage, table, losses, dataset, plan.fold_of_image)
    metrics = coco_metrics(dataset, table, plan.fold_of_image, plan.k)
    metrics["folds_run"] = {str(f): v for f, v in sorted(fold_info.items())}
    metrics["launch"] = {"gpus_per_fold": launch.num_gpus, "cpus_per_fold": launch.num_cpus,
                         "workers_per_fold": launch.workers,
                         "cluster": info.describe()}
    if in_sample:
        metrics["in_sample"] = _run_in_sample(dataset, storage.child(_rundir.IN_SAMPLE),
                                              replace(job, run_name=f"{job.run_name}-insample"),
                                              backend, progress)
    metrics["seconds"] = round(time.time() - started, 1)
    storage.write_json(_rundir.METRICS, metrics)
    _state.mark_finished(storage, state)
    run_dir = storage.local_root if storage.is_local else storage.uri
    return CVResult(run_dir=run_dir, dataset=dataset, plan=plan, metrics=metrics)


def _write_outputs(storage: Storage, table, losses, dataset: CocoDataset,
                   fold_of_image: np.ndarray) -> None:
    """Every output of a stitched run (the folds', or the in-sample baseline's)."""
    from .outputs._writers import write_all, write_box_losses

    write_all(storage, table, dataset)
    if losses is not None:
        write_box_losses(storage, losses, dataset, fold_of_image)


def _say(line: str, progress: bool) -> None:
    if progress:
        print(f"[kfold-ray] {line}", file=sys.stderr, flush=True)
    log.info(line)


def _job(storage: Storage, run_name: str, config: CVConfig, weights: str, launch):
    from .run._driver import FoldJob

    return FoldJob(storage=storage, run_name=run_name, config=config, weights=weights,
                   launch=launch)


def _run_and_stitch(dataset: CocoDataset, plan, job, backend: FoldBackend, progress: bool):
    """Run the folds of ``plan`` into ``job.storage``; return the stitched predictions, the box
    losses (None when the backend computes none) and per-fold info."""
    from .run._driver import run_folds
    from .run._progress import ProgressBoard
    from .run._reduce import Reducer

    board = ProgressBoard(plan.k, enabled=progress)
    with tempfile.TemporaryDirectory(prefix="kfold-ray-parts-") as cache:
        reducer = Reducer(job.storage, cache_dir=cache)
        try:
            fold_info = run_folds(dataset=dataset, plan=plan, job=job, backend=backend,
                                  reducer=reducer, board=board)
        finally:
            board.close()
        # The stitched table is gathered into new arrays: nothing points into the cache after.
        table = reducer.finish(plan.fold_of_image, dataset.num_images)
        losses = reducer.box_losses()
    return table, losses, fold_info


@dataclass(frozen=True)
class _AllImagesPlan:
    """The in-sample baseline as a one-"fold" plan: train on every image, predict every image."""

    num_images: int
    k: int = 1

    @property
    def fold_of_image(self) -> np.ndarray:
        return np.zeros(self.num_images, dtype=np.int64)

    def holdout_indices(self, fold: int) -> np.ndarray:
        return np.arange(self.num_images, dtype=np.int64)

    train_indices = holdout_indices


def _run_in_sample(dataset: CocoDataset, storage: Storage, job, backend: FoldBackend,
                   progress: bool) -> dict[str, Any]:
    """Train once on all images and predict them, into ``in_sample/`` (same outputs).

    Runs after the folds (it reuses their resources); resumable like a fold.
    """
    from .outputs._metrics import coco_metrics

    plan = _AllImagesPlan(dataset.num_images)
    table, losses, _ = _run_and_stitch(dataset, plan, replace(job, storage=storage), backend,
                                       progress)
    _write_outputs(storage, table, losses, dataset, plan.fold_of_image)
    return coco_metrics(dataset, table, plan.fold_of_image, 1)["pooled"]




# ---- the other commands ----------------------------------------------------------------------------
def validate_dataset(annotations: str | os.PathLike[str], image_root: str | os.PathLike[str] | None = None,
                     *, k: int | None = None, split: str = "kfold", groups: str | None = None,
                     exclude_unreadable: bool = False) -> tuple[CocoDataset, FoldPlan | None]:
    """Load and check a dataset (and, with ``k``, that its fold plan can be made) without
    starting Ray or writing anything. Raises DatasetError/ConfigError on bad input."""
    dataset = load_coco(annotations, image_root, exclude_unreadable=exclude_unreadable)
    plan = make_fold_plan(dataset, k, split=split, groups=groups) if k is not None else None
    return dataset, plan


@dataclass(frozen=True)
class ExampleData:
    """Where the built-in example's files went: paths, or URIs beside a URI run dir."""

    annotations: str
    image_root: str
    injected_errors: str


def example_data(run_dir: str, *, n_images: int = 150) -> ExampleData:
    """Write the built-in digits example beside ``run_dir`` (``<run-dir>-data``): into the
    run's storage when ``run_dir`` is a URI, where every node of a cluster reads it."""
    from .storage._storage import is_uri

    run_dir = str(run_dir).rstrip("/")
    if not is_uri(run_dir):
        example = make_digits_example(Path(run_dir).parent / f"{Path(run_dir).name}-data",
                                      n_images=n_images)
        return ExampleData(str(example.annotations_path), str(example.image_dir),
                           str(example.injected_errors_path))
    with tempfile.TemporaryDirectory(prefix="kfold-ray-example-") as tmp:
        local = make_digits_example(Path(tmp), n_images=n_images)
        data = Storage(f"{run_dir}-data", what="example data")
        data.check_usable()
        for f in sorted(p for p in Path(tmp).rglob("*") if p.is_file()):
            data.put_file(f, f.relative_to(tmp).as_posix())
        where = lambda path: data.uri_of(path.relative_to(tmp).as_posix())  # noqa: E731
        return ExampleData(where(local.annotations_path), where(local.image_dir),
                           where(local.injected_errors_path))


def run_example(data: ExampleData, *, run_dir: str, k: int = 3, max_iter: int = EXAMPLE_MAX_ITER,
                gpus_per_fold: float = 1.0, resume: bool = False,
                address: str | None = None) -> CVResult:
    """`run_cv` on the example's data with the example's model and schedule."""
    return run_cv(data.annotations, k, image_root=data.image_root, model=EXAMPLE_MODEL,
                  overrides=example_overrides(max_iter), gpus_per_fold=gpus_per_fold,
                  run_dir=run_dir, resume=resume, address=address)


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
    from .report._finished_run import open_run, synced_run_dir
    from .report._injected import (
        injected_errors_of,
        read_injected_errors,
        score_against_injected,
    )
    from .report._page import write_report
    from .report._rank import label_issues_for_run

    if isinstance(top, bool) or not isinstance(top, int) or top < 0:
        raise ConfigError(f"--top must be an integer >= 0, got {top!r}")
    calibrate = CALIBRATE_DEFAULT if calibrate is None else calibrate
    storage = Storage(str(run_dir))
    with synced_run_dir(storage) as local:
        run = open_run(local, dataset=dataset)
        rankings = {"out_of_fold": label_issues_for_run(run, calibrate=calibrate)}
        if run.has_in_sample:
            rankings["in_sample"] = label_issues_for_run(run, in_sample=True, calibrate=calibrate)
        page = write_report(run, rankings, top=top)
    known = (read_injected_errors(str(injected_errors)) if injected_errors is not None
             else injected_errors_of(run.dataset))
    files = (_rundir.LABEL_ISSUES_CSV, _rundir.LABEL_ISSUES_PARQUET, _rundir.BOX_ISSUES_PARQUET,
             page.relative_to(local).as_posix())
    return RunReport(rankings=rankings,
                     injected=score_against_injected(rankings["out_of_fold"], known or []),
                     files=tuple(storage.uri_of(name) for name in files))
