"""The run's state in its run dir: created, fingerprinted, reopened on --resume, marked finished.

`prepare` writes the fold plan, the config and ``run.json`` before any fold starts; `fingerprint`
is what a resume must match (what decides the predictions, not how they are scheduled). The
file names come from `kfold_ray.storage._rundir`, the one owner of the layout.
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timezone
from typing import Any

from .._config import CVConfig
from .._exceptions import ConfigError, DatasetError, ResumeError
from .._version import __version__
from ..data._dataset import CocoDataset
from ..data._fold_plan import FoldPlan
from ..storage._rundir import (
    CONFIG,
    EXCLUDED_IMAGES,
    FOLD_PLAN,
    LAST_CHECKPOINT,
    MODEL_CONFIG,
    RAN_WITH,
    RUN_STATE,
    fold_work,
    run_name,
)
from ..storage._storage import Storage


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ---- creating or reopening ------------------------------------------------------------------------
def prepare(storage: Storage, dataset: CocoDataset, config: CVConfig, plan: FoldPlan, *,
            resume: bool, fingerprint: str, model_config: str = "") -> FoldPlan:
    """Create the run dir (or reopen it, with ``resume``); return the fold plan to run.

    A new run dir must be empty; its plan, config and state are written first. A resumed one
    must hold a run made from the same inputs (``fingerprint``); its plan is read back from
    ``folds.json`` (a custom splitter need not be seeded to resume).
    """
    if resume:
        return _reopen(storage, dataset, fingerprint)
    if not storage.is_empty():
        raise ConfigError(f"run dir {storage.uri} is not empty: pass --resume to finish the run in it, "
                          "or choose another --run-dir")
    write_plan(storage, plan)
    if model_config:
        storage.write_text(MODEL_CONFIG, model_config)
    if dataset.excluded:
        storage.write_json(EXCLUDED_IMAGES, dataset.excluded_records())
    storage.write_json(CONFIG, config_record(dataset, config))
    storage.write_json(RUN_STATE, {
        "run_name": run_name(storage), "fingerprint": fingerprint,
        "dataset_fingerprint": dataset.fingerprint, "status": "running", "started": now(),
    })
    return plan


def _reopen(storage: Storage, dataset: CocoDataset, fingerprint: str) -> FoldPlan:
    if not storage.is_file(RUN_STATE):
        raise ResumeError(f"{storage.uri}: no run to resume here (no {RUN_STATE}); drop --resume to start one")
    state = read_state(storage)
    if state.get("fingerprint") != fingerprint:
        raise ResumeError(
            f"{storage.uri}: this run dir was made from another dataset or configuration "
            f"(dataset {str(state.get('dataset_fingerprint', '?'))[:12]} vs {dataset.fingerprint[:12]}); "
            "resume with the same inputs, or choose a new --run-dir"
        )
    plan = read_plan(storage)
    plan.check_matches(dataset)
    return plan


def read_state(storage: Storage) -> dict[str, Any]:
    try:
        state = storage.read_json(RUN_STATE)
    except (OSError, ValueError) as e:
        raise ResumeError(f"{storage.uri_of(RUN_STATE)}: unreadable run state ({e})") from e
    if not isinstance(state, dict):
        raise ResumeError(f"{storage.uri_of(RUN_STATE)}: run state is not a JSON object")
    return state


def mark_finished(storage: Storage, state: dict[str, Any]) -> None:
    storage.write_json(RUN_STATE, {**state, "status": "finished", "finished": now()})


def write_plan(storage: Storage, plan: FoldPlan) -> None:
    storage.write_json(FOLD_PLAN, plan.to_json(), indent=None)


def read_plan(storage: Storage) -> FoldPlan:
    """The fold plan of a run dir; ResumeError naming the file when it cannot be used."""
    where = storage.uri_of(FOLD_PLAN)
    try:
        doc = storage.read_json(FOLD_PLAN)
    except FileNotFoundError:
        raise ResumeError(f"{where}: no fold plan there") from None
    except (OSError, ValueError) as e:
        raise ResumeError(f"{where}: cannot read the fold plan: {e}") from None
    try:
        return FoldPlan.from_json(doc)
    except ResumeError as e:
        raise ResumeError(f"{where}: {e}") from None


def config_record(dataset: CocoDataset, config: CVConfig) -> dict[str, Any]:
    return {
        "kfold_ray_version": __version__,
        "annotations": str(dataset.annotations_path),
        "image_root": str(dataset.image_root),
        "dataset_fingerprint": dataset.fingerprint,
        "exclude_unreadable": bool(dataset.excluded),
        "num_images": dataset.num_images,
        "num_classes": dataset.num_classes,
        "config": config.to_json(),
        "versions": versions(),
    }


def versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for name in ("ray", "torch", "torchvision", "detectron2", "pycocotools", "cleanlab", "numpy", "pyarrow"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def fingerprint(dataset: CocoDataset, config: CVConfig, *, weights_id: str = "",
                model_config: str = "") -> str:
    """What decides a run's predictions: the dataset, the split, the seed, the model (its merged
    config as the backend dumps it, so a preset's definition counts, not just its name) and its
    weights, the score threshold, the versions of the libraries that compute them. How the run is
    scheduled (GPUs/CPUs per fold, retries, checkpoints, batch size) may change on --resume. The
    fold plan itself is read back from folds.json on resume."""
    import json

    installed = versions()
    decides = {
        "dataset": dataset.fingerprint, "k": config.k, "split": config.split, "seed": config.seed,
        "train": config.to_json()["train"], "score_threshold": config.predict.score_threshold,
        "weights": weights_id, "model_config": model_config,
        "versions": {name: installed[name] for name in ("torch", "torchvision", "detectron2")},
    }
    blob = json.dumps(decides, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def check_devices(storage: Storage, folds: list[int], *, gpus_per_fold: float) -> None:
    """Refuse, before any fold starts, a resume that would move a fold's checkpoint between CPU
    and GPU: each fold records what it trained with (``folds/fold_XXX/ran_with.json``); a fold
    with a checkpoint must go on the same kind of device (Detectron2's AMPTrainer cannot load a
    CPU checkpoint's state). Folds without a record (older run dirs) are not checked."""
    wants_gpu = gpus_per_fold > 0
    moved = []
    for fold in folds:
        work = storage.child(fold_work(fold))
        if not (work.is_file(LAST_CHECKPOINT) and work.is_file(RAN_WITH)):
            continue
        ran = work.read_json(RAN_WITH)
        if bool(ran.get("gpus")) != wants_gpu:
            moved.append((fold, ran))
    if moved:
        fold, ran = moved[0]
        was = f"{ran.get('device', '?')} (AMP {'on' if ran.get('amp') else 'off'})"
        now_on = f"{gpus_per_fold:g} GPU per fold" if wants_gpu else "the CPU (--gpus-per-fold 0)"
        back = f"--gpus-per-fold {ran.get('gpus'):g}" if ran.get("gpus") else "--gpus-per-fold 0"
        folds_text = ", ".join(str(f) for f, _ in moved)
        raise ResumeError(
            f"{storage.uri}: fold(s) {folds_text} trained on {was} and this resume would go on "
            f"with {now_on}: a checkpoint cannot move between CPU and GPU; resume with {back} "
            "as the run started, or start a new --run-dir")
# ---- a finished run, reopened -----------------------------------------------------------------------
def open_finished(storage: Storage, *, annotations: str | None = None,
                  image_root: str | None = None) -> tuple[CocoDataset, FoldPlan, dict[str, Any]]:
    """(dataset, fold plan, metrics) of a finished run dir, its dataset reloaded and checked
    against the run's fingerprint.

    ``annotations`` and ``image_root`` point at a dataset that has moved since the run (the
    same bytes elsewhere); by default the ones ``config.json`` records. With ``annotations``
    alone the images are looked for under the recorded image root.

    Raises ConfigError (not a finished run, a file missing or unreadable) or DatasetError (the
    dataset is gone, or it changed since the run), each naming the file.
    """
    from ..data._dataset import load_coco
    from ..storage._rundir import METRICS, PREDICTIONS_PARQUET

    if not storage.is_file(RUN_STATE):
        raise ConfigError(f"{storage.uri}: not a kfold-ray run dir (no {RUN_STATE})")
    state = read_state(storage)
    if state.get("status") != "finished":
        raise ConfigError(f"{storage.uri}: the run is not finished (status {state.get('status')!r}); "
                          "finish it with `kfold-ray run ... --resume` first")
    config = _read_record(storage, CONFIG)
    metrics = _read_record(storage, METRICS)
    if not storage.is_file(PREDICTIONS_PARQUET):
        raise ConfigError(f"{storage.uri}: {PREDICTIONS_PARQUET} is missing; not a finished kfold-ray run")
    try:
        annotations = annotations if annotations is not None else config["annotations"]
        image_root = image_root if image_root is not None else config["image_root"]
    except KeyError:
        raise ConfigError(f"{storage.uri_of(CONFIG)}: no annotations/image_root recorded; "
                          "pass annotations= and image_root=") from None
    # A run that left unreadable images out must leave the same ones out again (which needs the
    # images looked at); else the files only need to exist.
    excluded = bool(config.get("exclude_unreadable"))
    dataset = load_coco(str(annotations), str(image_root), check_images=excluded,
                        exclude_unreadable=excluded)
    expected = config.get("dataset_fingerprint")
    if expected and dataset.fingerprint != expected:
        raise DatasetError(
            f"not the dataset of run {storage.uri} (fingerprint {dataset.fingerprint[:12]}, the "
            f"run used {str(expected)[:12]}): the annotations or the images changed since the run, "
            "so its predictions no longer line up with the labels", path=str(dataset.annotations_path))
    try:
        plan = read_plan(storage)
        plan.check_matches(dataset)
    except ResumeError as e:
        raise ConfigError(str(e)) from None
    return dataset, plan, metrics


def _read_record(storage: Storage, name: str) -> dict[str, Any]:
    where = storage.uri_of(name)
    try:
        doc = storage.read_json(name)
    except FileNotFoundError:
        raise ConfigError(f"{storage.uri}: not a finished kfold-ray run dir (no {name})") from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"{where}: unreadable ({e})") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{where}: not a JSON object")
    return doc
