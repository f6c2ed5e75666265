"""The suspects as Label Studio tasks: a JSON list Label Studio imports as it is, and its labeling
config.

One task per suspect image, worst first:

    data          ``image`` (its URL, see `image_url`), and what kfold-ray knows of the image:
                  ``kfold_ray_image_id`` and ``kfold_ray_annotation_ids`` (what `_apply` matches
                  the corrections back with), ``file_name``, ``rank``, ``issue_kind``, ``fold``,
                  ``is_issue`` and the scores
    annotations   one annotation, the given boxes: what the reviewer corrects. Each region's
                  ``id`` is ``ann<COCO annotation id>`` (Label Studio keeps a region's id when
                  it is moved or relabelled), its ``meta.text`` what the ranking says of it
    predictions   the out-of-fold predictions (score >= the export's minimum), each region with
                  its ``score``; ``model_version`` names the fold model

Rectangles are in Label Studio's coordinates: ``x``, ``y``, ``width``, ``height`` in percent of
``original_width`` / ``original_height``, no rotation. The labeling config (`label_config`)
names the classes as `class_labels` does; it goes into the project before the tasks.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import quote
from xml.sax.saxutils import quoteattr

from ..storage._storage import is_uri
from ._coco_document import write_json_file
from ._suspects import GivenBox, PredictedBox, Suspect

__all__ = ["LOCAL_FILES_PREFIX", "label_config", "region_id", "write_labelstudio_tasks"]

#: Label Studio serves local files at this URL (``LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=true``
#: with ``LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT`` = the image root).
LOCAL_FILES_PREFIX = "/data/local-files/?d="
FROM_NAME, TO_NAME = "label", "image"
REGION_PREFIX = "ann"


def region_id(annotation_id: int) -> str:
    """The id of a given box's region: ``ann<COCO annotation id>``."""
    return f"{REGION_PREFIX}{int(annotation_id)}"


def label_config(labels: Sequence[str]) -> str:
    """Label Studio's labeling config: the image, and one rectangle label per class."""
    items = "\n".join(f"    <Label value={quoteattr(label)}/>" for label in labels)
    return ("<View>\n"
            '  <Header value="kfold-ray suspect #$rank: $issue_kind (image $kfold_ray_image_id)"/>\n'
            f'  <Image name="{TO_NAME}" value="$image" zoom="true"/>\n'
            f'  <RectangleLabels name="{FROM_NAME}" toName="{TO_NAME}">\n{items}\n'
            "  </RectangleLabels>\n</View>\n")


def image_url(suspect: Suspect, prefix: str | None) -> str:
    """The URL Label Studio loads the image from: ``prefix`` + its ``file_name`` (URL-quoted);
    by default the image's URI when the images are in an object store (Label Studio reads
    ``s3://``/``gs://`` through a connected cloud storage), else Label Studio's local-files
    URL (`LOCAL_FILES_PREFIX`)."""
    if prefix is None and is_uri(suspect.image_path):
        return suspect.image_path
    return (LOCAL_FILES_PREFIX if prefix is None else prefix) + quote(suspect.file_name)


def write_labelstudio_tasks(suspects: Sequence[Suspect], labels: Sequence[str],
                            out: str | os.PathLike[str], *, image_url_prefix: str | None = None,
                            run: str = "") -> tuple[Path, Path]:
    """Write the tasks JSON to ``out`` and the labeling config beside it (``<out stem>.xml``).

    ``labels``: the label of each class index (`class_labels`). Returns both paths.
    """
    tasks = [_task(s, labels, image_url(s, image_url_prefix), run) for s in suspects]
    path = write_json_file(out, tasks, indent=1)
    config = path.with_suffix(".xml")
    from ..storage._atomic import write_text

    write_text(config, label_config(labels))
    return path, config


def _task(s: Suspect, labels: Sequence[str], url: str, run: str) -> dict[str, Any]:
    data = {
        "image": url, "kfold_ray_image_id": s.image_id,
        "kfold_ray_annotation_ids": [b.annotation_id for b in s.given],
        "file_name": s.file_name, "rank": s.rank, "issue_kind": s.issue_kind or "none",
        "fold": s.fold, "is_issue": s.is_issue, "kfold_ray_run": run,
        **{k: v for k, v in s.scores.items() if v is not None},
    }
    given = [_region(s, b, labels, region_id(b.annotation_id)) for b in s.given]
    predicted = [_region(s, p, labels, f"pred{j}") for j, p in enumerate(s.predicted)]
    task: dict[str, Any] = {"data": data, "annotations": [{"result": given}]}
    if predicted:
        task["predictions"] = [{"model_version": f"kfold-ray fold {s.fold} (out-of-fold)",
                                "score": s.scores.get("combined_score") or 0.0,
                                "result": predicted}]
    return task


def _region(s: Suspect, box: GivenBox | PredictedBox, labels: Sequence[str], rid: str) -> dict[str, Any]:
    x1, y1, x2, y2 = box.xyxy
    region: dict[str, Any] = {
        "id": rid, "type": "rectanglelabels", "from_name": FROM_NAME, "to_name": TO_NAME,
        "original_width": s.width, "original_height": s.height, "image_rotation": 0,
        "value": {"x": 100.0 * x1 / s.width, "y": 100.0 * y1 / s.height,
                  "width": 100.0 * (x2 - x1) / s.width, "height": 100.0 * (y2 - y1) / s.height,
                  "rotation": 0, "rectanglelabels": [labels[box.class_index]]},
    }
    if isinstance(box, PredictedBox):
        region["score"] = box.score
    text = _describe(box.signals)
    if text:
        region["meta"] = {"text": [text]}
    return region


def _describe(signals: dict[str, Any]) -> str:
    """What the ranking says of a box, for the reviewer: ``swapped (named: evidence) -> dog, box
    score 0.98; loss_cls 2.31, ...`` (a kind without "named" is only the box's likeliest)."""
    parts = []
    if signals.get("kind"):
        score = signals.get("box_score")
        text = signals["kind"] + (" (named: evidence)" if signals.get("named") else "?")
        if signals.get("suggested_class"):
            text += f" -> {signals['suggested_class']}"
        parts.append(text + (f", box score {score:.3g}" if score is not None else ""))
    terms = [f"{k} {signals[k]:.3g}" for k in ("loss_cls", "loss_box_reg", "p_given", "p_other",
                                                 "p_background", "refined_iou")
             if signals.get(k) is not None]
    if terms:
        parts.append(", ".join(terms))
    return "; ".join(parts)
