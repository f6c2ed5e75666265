"""Reads a Label Studio JSON export (Export -> JSON, or ``GET /api/projects/<id>/export``): a list
of tasks, each with its ``data`` and ``annotations``.

Per task, the newest annotation that was not cancelled is the review (a task without one was
not reviewed). Its ``rectanglelabels`` regions are the boxes (``rectangle`` + ``labels`` regions
of one id, from a config that labels them apart, too), in percent of the image; a region id
``ann<N>`` is the COCO annotation N it was exported as. Regions without geometry (choices, text)
are left aside; other shapes (polygons, key points, rotated boxes) cannot become COCO boxes:
they are errors, as is a file that is not such a list.
"""

from __future__ import annotations

import re
from typing import Any

from ._coco_document import fail
from ._reviewed import Review, ReviewedBox, ReviewedImage

__all__ = ["looks_like_labelstudio", "read_labelstudio_export"]

_REGION_ID = re.compile(r"^ann(\d+)$")
_SHAPES = {"polygonlabels", "polygon", "keypointlabels", "keypoint", "ellipselabels", "ellipse",
           "brushlabels", "brush", "vectorlabels", "bitmasklabels"}


def looks_like_labelstudio(doc: Any) -> bool:
    return isinstance(doc, list) and all(isinstance(t, dict) and "data" in t for t in doc)


def read_labelstudio_export(doc: list[dict[str, Any]], path: str) -> Review:
    """The review in a Label Studio JSON export ``doc`` (read from ``path``)."""
    images = []
    for k, task in enumerate(doc):
        item = f"task {task.get('id', k)}"
        annotation = _newest(task, item, path)
        if annotation is None:
            continue
        data = task["data"] if isinstance(task["data"], dict) else {}
        image_id = data.get("kfold_ray_image_id")
        if image_id is not None and type(image_id) is not int:
            raise fail(path, f"{item}: 'kfold_ray_image_id' must be an integer, got {image_id!r}")
        file_name = data.get("file_name") if isinstance(data.get("file_name"), str) else None
        if image_id is None and file_name is None:
            raise fail(path, f"{item}: its data names no image (no 'kfold_ray_image_id' or "
                             "'file_name'): not a task kfold-ray exported")
        boxes = _boxes(annotation.get("result"), f"{item}, annotation {annotation.get('id', '?')}", path)
        images.append(ReviewedImage(image_id, file_name, None, boxes, item))
    return Review(path=path, format="labelstudio", images=tuple(images))


def _newest(task: dict[str, Any], item: str, path: str) -> dict[str, Any] | None:
    annotations = task.get("annotations", [])
    if not isinstance(annotations, list):
        raise fail(path, f"{item}: 'annotations' must be a list (export as JSON, not JSON_MIN)")
    done = [a for a in annotations if isinstance(a, dict) and not a.get("was_cancelled")]
    if not done:
        return None
    # ISO timestamps sort as text; without them the list's order (Label Studio's: oldest first).
    return max(enumerate(done), key=lambda ia: (str(ia[1].get("updated_at") or ia[1].get("created_at")
                                                    or ""), ia[0]))[1]


def _boxes(result: Any, where: str, path: str) -> tuple[ReviewedBox, ...]:
    if not isinstance(result, list):
        raise fail(path, f"{where}: 'result' must be a list of regions")
    regions: dict[str, dict[str, Any]] = {}
    order: list[str] = []
    for j, r in enumerate(result):
        if not isinstance(r, dict):
            raise fail(path, f"{where}: result[{j}] is not an object")
        kind = str(r.get("type", ""))
        rid = str(r.get("id", f"#{j}"))
        if kind in _SHAPES:
            raise fail(path, f"{where}, region {rid!r}: a {kind!r} region cannot become a COCO box "
                             "(only rectangles can)")
        if kind not in ("rectanglelabels", "rectangle", "labels"):
            continue  # choices, text areas, ratings: no geometry
        if rid not in regions:
            regions[rid] = {}
            order.append(rid)
        regions[rid].update({k: v for k, v in (r.get("value") or {}).items()})
        regions[rid].setdefault("_types", set()).add(kind)
    return tuple(_box(rid, regions[rid], where, path) for rid in order)


def _box(rid: str, value: dict[str, Any], where: str, path: str) -> ReviewedBox:
    item = f"{where}, region {rid!r}"
    types = value.pop("_types")
    if types == {"labels"}:
        raise fail(path, f"{item}: a label without a rectangle")
    labels = value.get("rectanglelabels", value.get("labels"))
    if not isinstance(labels, list) or len(labels) != 1 or not isinstance(labels[0], str):
        raise fail(path, f"{item}: needs exactly one class label, got {labels!r}")
    numbers = [value.get(k) for k in ("x", "y", "width", "height")]
    if any(type(v) not in (int, float) for v in numbers):
        raise fail(path, f"{item}: x, y, width, height must be numbers, got {numbers!r}")
    rotation = value.get("rotation", 0) or 0
    if type(rotation) not in (int, float) or abs(rotation) > 1e-6:
        raise fail(path, f"{item}: rotated by {rotation!r} degrees; a COCO box cannot be rotated")
    m = _REGION_ID.match(rid)
    return ReviewedBox(label=labels[0], box=tuple(float(v) for v in numbers),  # type: ignore[arg-type]
                       annotation_id=int(m.group(1)) if m else None, item=item, percent=True,
                       id_is_ours=m is not None)
