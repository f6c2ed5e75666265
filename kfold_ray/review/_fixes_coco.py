"""Reads a COCO json of reviewed images: CVAT's "COCO 1.0" export, FiftyOne's
``COCODetectionDataset`` export, or kfold-ray's own COCO subset after editing.

Every image the file lists was reviewed: its non-crowd annotations are the boxes as the reviewer
left them (crowd regions are not reviewed and stay as they were). Classes are matched by
category name (tools renumber category ids), images by file name (`_apply`; tools renumber image
ids), annotations by id where the ids are the dataset's, else by overlap. An annotation's
``coco_id`` (FiftyOne writes each label's attributes: kfold-ray's FiftyOne export gives every
given box its COCO annotation id there) is its id in the dataset, whatever its ``id``.
"""

from __future__ import annotations

from typing import Any

from ._coco_document import fail
from ._reviewed import Review, ReviewedBox, ReviewedImage

__all__ = ["looks_like_coco", "read_coco_export"]


def looks_like_coco(doc: Any) -> bool:
    return isinstance(doc, dict) and all(isinstance(doc.get(k), list)
                                         for k in ("images", "annotations", "categories"))


def read_coco_export(doc: dict[str, Any], path: str) -> Review:
    """The review in a COCO json ``doc`` (read from ``path``)."""
    names = _category_names(doc["categories"], path)
    images: dict[int, tuple[str, tuple[int, int] | None]] = {}
    for k, im in enumerate(doc["images"]):
        item = f"images[{k}]"
        if not isinstance(im, dict) or type(im.get("id")) is not int:
            raise fail(path, f"{item}: needs an integer 'id'")
        if not isinstance(im.get("file_name"), str) or not im["file_name"]:
            raise fail(path, f"{item} (id {im['id']}): needs a 'file_name'")
        if im["id"] in images:
            raise fail(path, f"{item}: image id {im['id']} is listed twice")
        size = (im.get("width"), im.get("height"))
        images[im["id"]] = (im["file_name"], size if all(type(v) is int for v in size) else None)
    boxes: dict[int, list[ReviewedBox]] = {i: [] for i in images}
    for k, a in enumerate(doc["annotations"]):
        box = _annotation(a, k, names, images, path)
        if box is not None:
            boxes[int(a["image_id"])].append(box)
    return Review(path=path, format="coco", images=tuple(
        ReviewedImage(None, name, size, tuple(boxes[i]), f"images[{k}] (id {i}, {name!r})")
        for k, (i, (name, size)) in enumerate(images.items())))


def _category_names(categories: list[Any], path: str) -> dict[int, str]:
    names: dict[int, str] = {}
    for k, c in enumerate(categories):
        if not isinstance(c, dict) or type(c.get("id")) is not int or not isinstance(c.get("name"), str):
            raise fail(path, f"categories[{k}]: needs an integer 'id' and a 'name'")
        names[c["id"]] = c["name"]
    return names


def _annotation(a: Any, k: int, names: dict[int, str],
                images: dict[int, tuple[str, tuple[int, int] | None]], path: str) -> ReviewedBox | None:
    """One annotation as a reviewed box; None for a crowd region (not reviewed)."""
    item = f"annotations[{k}]" + (f" (id {a['id']})" if isinstance(a, dict) and type(a.get("id")) is int else "")
    if not isinstance(a, dict):
        raise fail(path, f"{item}: not an object")
    if a.get("iscrowd") in (1, True):
        return None
    if a.get("image_id") not in images:
        raise fail(path, f"{item}: 'image_id' {a.get('image_id')!r} is not in the file's 'images'")
    if a.get("category_id") not in names:
        raise fail(path, f"{item}: 'category_id' {a.get('category_id')!r} is not in the file's 'categories'")
    bbox = a.get("bbox")
    if not isinstance(bbox, list) or len(bbox) != 4 or any(type(v) not in (int, float) for v in bbox):
        raise fail(path, f"{item}: 'bbox' must be 4 numbers [x, y, width, height], got {bbox!r}")
    # FiftyOne renumbers annotations but keeps ours in 'coco_id' (kfold-ray's FiftyOne export).
    ours = type(a.get("coco_id")) is int
    ann_id = a["coco_id"] if ours else (a.get("id") if type(a.get("id")) is int else None)
    return ReviewedBox(label=names[a["category_id"]], box=tuple(float(v) for v in bbox),  # type: ignore[arg-type]
                       annotation_id=ann_id, item=item, id_is_ours=ours)
