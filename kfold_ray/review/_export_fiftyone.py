"""The suspects as a folder FiftyOne loads: ``fo.Dataset.from_dir(OUT,
dataset_type=fo.types.FiftyOneDataset)``.

Written in FiftyOne's own dataset layout (its "legacy" FiftyOneDataset: ``metadata.json`` with
the sample fields' types, ``samples.json`` with one serialized sample each), with no FiftyOne
import and no database here: the images stay where they are (``filepath``: their path or URI).
Per sample (one per suspect image, worst first):

    ground_truth    Detections: the given boxes; each carries ``coco_id`` (its COCO annotation
                    id) and its signals (`_suspects.box_signals`): from the per-box ranking
                    ``kind``, ``box_score`` (higher = more likely wrong), ``named`` (the kind is
                    evidence) and ``suggested_class`` (a swap: the class the model sees);
                    ``loss_cls``, ``loss_box_reg``, ``p_given``, ``p_other``, ``p_background``,
                    ``refined_iou`` (the fold model's heads) when the run has them
    predictions     Detections: the out-of-fold predictions, ``confidence`` = score (``kind``
                    on one the ranking names, e.g. an overlooked object)
    rank, issue_kind, is_issue, fold, file_name, coco_id (the COCO image id), and the scores
                    (box_score: the order, quality_score, combined_score, loss_score, unmatched_score,
                    overlooked_score, swap_score, badloc_score)
    metadata        the image's width and height

Boxes are FiftyOne's relative ``[x, y, width, height]`` in [0, 1]. The dataset's
``default_classes`` are the class labels. FiftyOne's COCO export of ``ground_truth`` keeps
``coco_id`` on every annotation (its ``extra_attrs``), which `_apply` matches the fixes by.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from .._exceptions import ConfigError
from ..storage._storage import is_uri
from ._coco_document import write_json_file
from ._suspects import SCORE_COLUMNS, GivenBox, PredictedBox, Suspect

__all__ = ["write_fiftyone_dataset"]

_FIELD = "fiftyone.core.fields."
SAMPLE_FIELDS = {
    "filepath": _FIELD + "StringField",
    "tags": _FIELD + "ListField(fiftyone.core.fields.StringField)",
    "metadata": _FIELD + "EmbeddedDocumentField(fiftyone.core.metadata.ImageMetadata)",
    "ground_truth": _FIELD + "EmbeddedDocumentField(fiftyone.core.labels.Detections)",
    "predictions": _FIELD + "EmbeddedDocumentField(fiftyone.core.labels.Detections)",
    "rank": _FIELD + "IntField",
    "coco_id": _FIELD + "IntField",
    "fold": _FIELD + "IntField",
    "file_name": _FIELD + "StringField",
    "issue_kind": _FIELD + "StringField",
    "is_issue": _FIELD + "BooleanField",
    **{name: _FIELD + "FloatField" for name in SCORE_COLUMNS},
}


def write_fiftyone_dataset(suspects: Sequence[Suspect], labels: Sequence[str],
                           out: str | os.PathLike[str], *, run: str = "") -> Path:
    """Write the FiftyOne dataset folder ``out`` (created; it must not hold another dataset)."""
    out = os.fspath(out)
    if is_uri(out):
        raise ConfigError(f"--out {out!r}: give a local folder (FiftyOne loads it from disk)")
    folder = Path(out).absolute()
    if folder.is_file() or (folder.is_dir() and any(folder.iterdir())
                            and not (folder / "samples.json").is_file()):
        raise ConfigError(f"--out {out}: not an empty folder (nor an earlier FiftyOne export)")
    folder.mkdir(parents=True, exist_ok=True)
    samples = [_sample(s, labels) for s in suspects]
    # samples.json first: metadata.json names the folder a dataset, so it comes last.
    write_json_file(folder / "samples.json", {"samples": samples})
    write_json_file(folder / "metadata.json", {
        "name": "kfold-ray-suspects", "media_type": "image", "sample_fields": SAMPLE_FIELDS,
        "info": {"default_classes": list(labels),
                 "kfold_ray": {"run": run, "what": "suspected label errors, worst first"}},
    }, indent=1)
    return folder


def _sample(s: Suspect, labels: Sequence[str]) -> dict[str, Any]:
    return {
        "filepath": s.image_path, "tags": [],
        "metadata": {"_cls": "ImageMetadata", "width": s.width, "height": s.height},
        "ground_truth": {"_cls": "Detections", "detections": [_given(s, b, labels) for b in s.given]},
        "predictions": {"_cls": "Detections",
                        "detections": [_predicted(s, p, labels) for p in s.predicted]},
        "rank": s.rank, "coco_id": s.image_id, "fold": s.fold, "file_name": s.file_name,
        "issue_kind": s.issue_kind, "is_issue": s.is_issue, **s.scores,
    }


def _relative(s: Suspect, xyxy: tuple[float, float, float, float]) -> list[float]:
    x1, y1, x2, y2 = xyxy
    return [x1 / s.width, y1 / s.height, (x2 - x1) / s.width, (y2 - y1) / s.height]


def _given(s: Suspect, b: GivenBox, labels: Sequence[str]) -> dict[str, Any]:
    return {"_cls": "Detection", "label": labels[b.class_index], "bounding_box": _relative(s, b.xyxy),
            "coco_id": b.annotation_id, **{k: v for k, v in b.signals.items() if v is not None}}


def _predicted(s: Suspect, p: PredictedBox, labels: Sequence[str]) -> dict[str, Any]:
    return {"_cls": "Detection", "label": labels[p.class_index], "bounding_box": _relative(s, p.xyxy),
            "confidence": p.score, **{k: v for k, v in p.signals.items() if v is not None}}
