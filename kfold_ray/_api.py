"""The Python API: `run_cv`, the whole job in one call (it hands back a `CVResult`, `_result`);
and one function for each other command of the CLI (`validate_dataset`, `doctor`,
`example_data` + `run_example`; `report_run`, `export_for_review` and `apply_fixes` come from the
stages after the run), so that the CLI only parses flags and prints.

Order of work (each step only after the one before succeeded):
    load + validate the dataset -> check options -> plan folds -> check the model config
    -> fetch MODEL.WEIGHTS once -> check the run's storage
    -> (nothing reserved or written before this line) -> run dir -> Ray -> folds stream
    -> stitch -> outputs -> metrics
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Hashable, Mapping, Sequence

import numpy as np

from ._backend import FoldBackend
from ._config import DEFAULT_MODEL, CVConfig, FailureConfig, PredictConfig, TrainConfig
from ._exceptions import ConfigError
from ._result import CVResult, RunReport, open_run, report_run  # noqa: F401  (re-exported)
from .data._dataset import CocoDataset, load_coco
from .data._example import (
    EXAMPLE_MAX_ITER,
    EXAMPLE_MODEL,
    example_overrides,
    make_digits_example,
)
from .data._fold_plan import FoldPlan
from .data._split import make_fold_plan
from .report._rank import CALIBRATE_DEFAULT  # noqa: F401  (re-exported for the CLI)
# The review commands: `export_for_review` (a finished run's suspects for FiftyOne, Label Studio
# or CVAT) and `apply_fixes` (a review back into the COCO json).
from .review._commands import EXPORT_FORMATS, apply_fixes  # noqa: F401  (re-exported)
from .review._commands import export_run as export_for_review  # noqa: F401
from .run import _state
from .storage import _rundir
from .storage._storage import Storage, file_sha256

log = logging.getLogger(__name__)


def run_cv(
    dataset: CocoDataset | str | os.PathLike[str],
    k: int = 5,
    *,
    image_root: str | os.PathLike[str] | None = None,
    model: str = DEFAULT_MODEL,
    overrides: Sequence[str] | Mapping[str, Any] | None = None,
    gpus_per_fold: float = 1.0,
    cpus_per_fold: float | None = None,
    workers_per_fold: int | None = None,
    workers_across_nodes: bool = False,
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
        overrides: Detectron2 ``KEY VALUE`` overrides, flat, e.g. ``["SOLVER.MAX_ITER", "2000"]``,
            or a dict, e.g. ``{"SOLVER.MAX_ITER": 2000, "SOLVER.STEPS": (1500, 1800)}`` (the
            same run either way); a bare string is refused.
        gpus_per_fold: GPUs per fold actor; fractional packs folds on one GPU. On a local
            cluster without GPUs, folds train on CPU.
        cpus_per_fold: CPUs per fold actor (its data-loading workers); default: its share of
            its node's CPUs per GPU, 1 per worker without GPUs.
        workers_per_fold: processes that train each fold data-parallel through Ray Train (DDP;
            gloo on CPU); ``SOLVER.IMS_PER_BATCH`` is their total batch. Default: the whole
            number of GPUs per fold (one GPU per worker), else 1.
        workers_across_nodes: let a multi-GPU fold's workers spread over nodes (default: one
            node per fold, so only nodes with that many GPUs host it).
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
        workers_per_fold=workers_per_fold, workers_across_nodes=workers_across_nodes,
        train=TrainConfig(model=model, overrides=() if overrides is None else overrides, amp=amp),
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
    for line in [*lines, info.dashboard()]:
        if line:
            _say(line, progress)
    unfinished = [f for f in range(plan.k)
                  if not storage.is_file(f"{_rundir.fold_parts(f)}/{_rundir.DONE}")]
    _state.check_devices(storage, unfinished, gpus_per_fold=launch.num_gpus)
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


def doctor(address: str | None = None, storage: str | os.PathLike[str] | None = None):
    """What every node of the cluster has (torch, CUDA, driver, GPUs, Detectron2, CPUs) and,
    with ``storage``, whether each reaches it; a `kfold_ray.cluster._doctor.Checkup` whose
    ``problems`` lists what would make a run fail or crawl. Starts or joins Ray like `run_cv`."""
    from .cluster._doctor import check_cluster

    return check_cluster(address, None if storage is None else str(storage))


@dataclass(frozen=True)
class ExampleData:
    """Where the built-in example's files went: paths, or URIs beside a URI run dir."""

    annotations: str
    image_root: str
    injected_errors: str


def example_data(run_dir: str, *, n_images: int = 150, seed: int = 0) -> ExampleData:
    """Write the built-in digits example beside ``run_dir`` (``<run-dir>-data``): into the
    run's storage when ``run_dir`` is a URI, where every node of a cluster reads it. ``seed``
    draws its images and errors (the same seed, the same bytes)."""
    from .storage._storage import is_uri

    run_dir = str(run_dir).rstrip("/")
    if not is_uri(run_dir):
        example = make_digits_example(Path(run_dir).parent / f"{Path(run_dir).name}-data",
                                      n_images=n_images, seed=seed)
        return ExampleData(str(example.annotations_path), str(example.image_dir),
                           str(example.injected_errors_path))
    with tempfile.TemporaryDirectory(prefix="kfold-ray-example-") as tmp:
        local = make_digits_example(Path(tmp), n_images=n_images, seed=seed)
        data = Storage(f"{run_dir}-data", what="example data")
        data.check_usable()
        for f in sorted(p for p in Path(tmp).rglob("*") if p.is_file()):
            data.put_file(f, f.relative_to(tmp).as_posix())
        where = lambda path: data.uri_of(path.relative_to(tmp).as_posix())  # noqa: E731
        return ExampleData(where(local.annotations_path), where(local.image_dir),
                           where(local.injected_errors_path))


def run_example(data: ExampleData, *, run_dir: str, k: int = 3, max_iter: int = EXAMPLE_MAX_ITER,
                gpus_per_fold: float = 1.0, resume: bool = False,
                address: str | None = None, seed: int = 0) -> CVResult:
    """`run_cv` on the example's data with the example's model and schedule.

    A run dir that already holds this example run, finished, is reopened (`open_run`; its
    ``metrics["reopened"]`` is True) rather than refused; one holding another or an unfinished
    run is refused with what to do (``--resume``, or another run dir)."""
    overrides = example_overrides(max_iter)
    storage = Storage(str(run_dir))
    if not resume and storage.is_file(_rundir.RUN_STATE):
        return _reopen_example(storage, data, k=k, overrides=overrides, seed=seed)
    return run_cv(data.annotations, k, image_root=data.image_root, model=EXAMPLE_MODEL,
                  overrides=overrides, gpus_per_fold=gpus_per_fold, seed=seed,
                  run_dir=run_dir, resume=resume, address=address)


def _reopen_example(storage: Storage, data: ExampleData, *, k: int, overrides: list[str],
                    seed: int) -> CVResult:
    fresh = f"or choose another --run-dir (e.g. {storage.uri}-2) for a new one"
    if _state.read_state(storage).get("status") != "finished":
        raise ConfigError(f"{storage.uri} holds an unfinished example run: finish it with "
                          f"`kfold-ray example --resume` (same options), {fresh}")
    made = storage.read_json(_rundir.CONFIG).get("config", {})
    asked = {"k": k, "seed": seed, "model": EXAMPLE_MODEL, "overrides": overrides}
    had = {"k": made.get("k"), "seed": made.get("seed"), "model": made.get("train", {}).get("model"),
           "overrides": list(made.get("train", {}).get("overrides", []))}
    try:
        if had != asked:
            raise ConfigError("")
        result = open_run(storage.uri, annotations=data.annotations, image_root=data.image_root)
    except (ConfigError, ValueError):
        raise ConfigError(f"{storage.uri} holds a finished example run made with other options "
                          f"(-k, --seed, --max-iter or --images): {fresh}") from None
    result.metrics["reopened"] = True
    return result
