"""A finished run dir, opened for the report: wherever it lies (a local copy of what the report
reads when it is in an object store, uploaded back on exit), its dataset reloaded and checked
against the run's fingerprint."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from .._exceptions import ConfigError, DatasetError
from ..storage import _rundir
from ..storage._storage import Storage

if TYPE_CHECKING:
    from ..data._dataset import CocoDataset

__all__ = ["FinishedRun", "read_finished_run", "synced_run_dir"]

IN_SAMPLE_DIR = _rundir.IN_SAMPLE
PREDICTIONS = _rundir.PREDICTIONS_PARQUET
# What the report reads of a run dir (copied down first when the run dir is in an object store).
_REPORT_INPUTS = (_rundir.RUN_STATE, _rundir.CONFIG, _rundir.METRICS, _rundir.FOLD_PLAN, PREDICTIONS,
                  f"{IN_SAMPLE_DIR}/{PREDICTIONS}", _rundir.BOX_LOSSES_PARQUET,
                  f"{IN_SAMPLE_DIR}/{_rundir.BOX_LOSSES_PARQUET}")


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


def read_finished_run(run_dir: str | os.PathLike[str], *, dataset: CocoDataset | None = None) -> FinishedRun:
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
        from ..data._dataset import load_coco

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
    from ..data._fold_plan import FoldPlan

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


