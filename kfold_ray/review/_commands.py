"""The two review commands end to end (`kfold_ray._api` wraps them for Python and the CLI):

    export_run    a finished run's worst images -> FiftyOne / Label Studio / COCO files
    apply_fixes   a fixes file from one of the tools -> the corrected COCO json + the changes
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._exceptions import ConfigError
from ..run import _state
from ..storage import _rundir
from ..storage._storage import Storage, is_uri

__all__ = ["EXPORT_FORMATS", "ExportedReview", "FixedDataset", "apply_fixes", "export_run"]

EXPORT_FORMATS = ("fiftyone", "labelstudio", "coco")
#: Predictions under this score are left out of an export by default: Label Studio shows every
#: one it is given (the report page draws the same ones); FiftyOne filters them in its App, so
#: it gets all of them (those the run kept: its score threshold).
DEFAULT_MIN_SCORE = {"fiftyone": 0.0, "labelstudio": 0.5, "coco": 0.0}
CHANGE_COLUMNS = ("image_id", "file_name", "annotation_id", "change", "before", "after")


@dataclass(frozen=True)
class ExportedReview:
    """What `export_run` wrote: ``files`` (the export, then any companion: Label Studio's
    labeling config), how many ``suspects``, in which format (``to``)."""

    to: str
    files: tuple[str, ...]
    suspects: int


def export_run(run_dir: str | os.PathLike[str], *, to: str, out: str | os.PathLike[str],
               top: int = 100, min_score: float | None = None, image_url: str | None = None,
               annotations: str | None = None, image_root: str | None = None) -> ExportedReview:
    """Export a finished run's ``top`` worst images (its default ranking) for review
    (``kfold_ray._api.export_for_review``, ``kfold-ray export``).

    Args:
        run_dir: a finished run's folder (path or URI).
        to: ``fiftyone`` (a folder ``fo.Dataset.from_dir`` reads: ``ground_truth``,
            ``predictions`` and our scores: `_export_fiftyone`), ``labelstudio`` (a tasks JSON
            Label Studio imports, and its labeling config ``<out stem>.xml``:
            `_export_labelstudio`), or ``coco`` (the suspects as a COCO subset, ids kept: CVAT
            imports it as COCO 1.0: `_export_coco`).
        out: the folder (fiftyone) or file (labelstudio, coco) to write, a local path.
        top: how many of the worst images.
        min_score: leave out predictions scoring below it (default `DEFAULT_MIN_SCORE`).
        image_url: Label Studio only: the URL prefix the image root is served at (default:
            Label Studio's local files, ``/data/local-files/?d=``; a URI image root stays a URI).
        annotations, image_root: where the dataset is now, if it moved since the run.

    Raises ConfigError (not a finished run, a bad option) or DatasetError (the dataset is gone
    or changed since the run) before anything is written.
    """
    from ..report._finished_run import read_finished_run, synced_run_dir
    from ..report._rank import issues_for_run
    from ._suspects import class_labels, select_suspects

    if to not in EXPORT_FORMATS:
        raise ConfigError(f"--to must be one of {', '.join(EXPORT_FORMATS)}, got {to!r}")
    if image_url is not None and to != "labelstudio":
        raise ConfigError("--image-url is for --to labelstudio only")
    storage = Storage(str(run_dir))
    dataset, _, _ = _state.open_finished(storage, annotations=annotations, image_root=image_root)
    with synced_run_dir(storage) as local:
        run = read_finished_run(local, dataset=dataset)
        ranking, boxes = issues_for_run(run)
        losses = local / _rundir.BOX_LOSSES_PARQUET
        suspects = select_suspects(
            dataset, ranking, local / _rundir.PREDICTIONS_PARQUET, top=top,
            box_losses=losses if losses.is_file() else None, box_issues=boxes,
            min_score=DEFAULT_MIN_SCORE[to] if min_score is None else min_score)
    name = storage.uri
    if to == "coco":
        from ._export_coco import write_coco_subset

        files: tuple[Path, ...] = (write_coco_subset(dataset.annotations_path, suspects, out, run=name),)
    elif to == "labelstudio":
        from ._export_labelstudio import write_labelstudio_tasks

        files = write_labelstudio_tasks(suspects, class_labels(dataset), out,
                                        image_url_prefix=image_url, run=name)
    else:
        from ._export_fiftyone import write_fiftyone_dataset

        files = (write_fiftyone_dataset(suspects, class_labels(dataset), out, run=name),)
    return ExportedReview(to=to, files=tuple(str(f) for f in files), suspects=len(suspects))


@dataclass(frozen=True)
class FixedDataset:
    """What `apply_fixes` wrote: the corrected COCO json (``annotations``), the changes table
    (``changes_csv``, and ``changes``: one dict per change, `CHANGE_COLUMNS`), how many images
    the review covered."""

    annotations: str
    changes_csv: str
    changes: tuple[dict[str, Any], ...]
    reviewed_images: int


def default_fixed_path(annotations: str) -> str:
    """``<folder>/<stem>.fixed.json`` beside a local annotations json."""
    path = Path(annotations)
    stem = path.name[:-5] if path.name.endswith(".json") else path.name
    return str(path.with_name(f"{stem}.fixed.json"))


def apply_fixes(annotations: str | os.PathLike[str], fixes: str | os.PathLike[str], *,
                out: str | os.PathLike[str] | None = None) -> FixedDataset:
    """Write the dataset corrected by a review: boxes moved, reclassified, deleted and added
    (``kfold_ray._api.apply_fixes``, ``kfold-ray apply``; how boxes are matched: `_apply`).

    Args:
        annotations: the original COCO json (path or URI); never overwritten.
        fixes: a Label Studio JSON export, or a COCO json from CVAT (COCO 1.0), FiftyOne
            (``COCODetectionDataset``: the file or its folder) or an edited kfold-ray COCO export.
        out: the corrected json (default `default_fixed_path`); the changes go beside it
            (``<out stem>.changes.csv``: image, annotation, change, before, after).

    Raises DatasetError naming the file and the item (an image not in the dataset, an unknown
    class, a box outside its image, a file of another format), with nothing written.
    """
    from ..storage._atomic import write_text
    from ._apply import apply_review, read_fixes
    from ._coco_document import write_json_file

    annotations = os.fspath(annotations)
    if out is None:
        if is_uri(annotations):
            raise ConfigError(f"--annotations {annotations} is a URI: give --out (a local path)")
        out = default_fixed_path(annotations)
    out = os.fspath(out)
    if not is_uri(annotations) and Path(out).absolute() == Path(annotations).absolute():
        raise ConfigError(f"--out {out} is the original annotations file: write the corrected "
                          "dataset to another file (and keep the original)")
    fixed = apply_review(annotations, read_fixes(fixes))
    rows = [{c: getattr(change, c) for c in CHANGE_COLUMNS} for change in fixed.changes]
    written = write_json_file(out, fixed.document)
    table = written.with_name(written.name[:-5] if written.name.endswith(".json") else written.name)
    table = table.with_name(table.name + ".changes.csv")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CHANGE_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(table, buffer.getvalue())
    return FixedDataset(annotations=str(written), changes_csv=str(table), changes=tuple(rows),
                        reviewed_images=fixed.reviewed_images)
