"""Apply a review to the dataset: the corrected COCO json, and every change in a table.

A fixes file (`read_fixes`: a Label Studio JSON export, or a COCO json from CVAT, FiftyOne or
kfold-ray's own COCO subset) names the images that were reviewed and their boxes as the
reviewer left them. Per reviewed image, each box is matched to a given annotation:

1. by annotation id, where the ids are the dataset's (Label Studio regions ``ann<id>``,
   FiftyOne's ``coco_id``; a COCO file whose every id is a given annotation of the same image);
2. else by overlap: the unmatched box and given annotation with the highest IoU (>= 0.5) pair
   up, and so on (tools that renumber annotations).

A matched box whose class differs is ``reclassified``, whose box moved by more than 0.01 px is
``moved``; an unmatched given (non-crowd) annotation is ``deleted``, an unmatched box ``added``
(new ids after the largest id). Crowd regions are not reviewed. Everything else is the same
parsed object in the same place: every image, category and top-level key, every unknown field;
an edited annotation keeps its other fields (a moved box's segmentation too: a warning says it
no longer matches). Bad input (an image not in the dataset, an unknown class, a box outside its
image, a file of the wrong format) is a DatasetError naming the file and the item.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._exceptions import DatasetError
from ..data.validate import _json
from ..data.validate._json import BOX_TOLERANCE_PX
from ..storage._storage import open_location
from ._coco_document import fail, read_coco_document
from ._fixes_coco import looks_like_coco, read_coco_export
from ._fixes_labelstudio import looks_like_labelstudio, read_labelstudio_export
from ._reviewed import Review, ReviewedBox, ReviewedImage

__all__ = ["AppliedFixes", "Change", "apply_review", "read_fixes"]

MATCH_IOU = 0.5
MOVED_PX = 0.01


@dataclass(frozen=True)
class Change:
    """One change: ``change`` is moved | reclassified | deleted | added; ``before`` / ``after``
    the class name or the ``[x, y, width, height]`` box ("" where there is none)."""

    image_id: int
    file_name: str
    annotation_id: int
    change: str
    before: str
    after: str


@dataclass(frozen=True)
class AppliedFixes:
    """The corrected COCO json (``document``), the changes, worst image first as reviewed, and
    how many images the review covered."""

    document: dict[str, Any]
    changes: tuple[Change, ...]
    reviewed_images: int


# ---- reading the fixes ------------------------------------------------------------------------------
def read_fixes(location: str | os.PathLike[str]) -> Review:
    """Read a fixes file (a path or a URI; a folder FiftyOne exported as COCO: its
    ``labels.json``), whichever of the supported formats it is."""
    location = os.fspath(location)
    fs, path, where = open_location(location, what="fixes file")
    import pyarrow.fs as pafs

    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        if fs.get_file_info(path.rstrip("/") + "/labels.json").type == pafs.FileType.File:
            path, where = path.rstrip("/") + "/labels.json", where.rstrip("/") + "/labels.json"
        else:
            raise DatasetError("a folder without labels.json: give the exported file (Label Studio "
                               "JSON, or COCO: FiftyOne's COCODetectionDataset export, CVAT's COCO 1.0)",
                               path=where)
    elif info.type == pafs.FileType.NotFound:
        raise DatasetError("fixes file not found", path=where)
    with fs.open_input_file(path) as f:
        raw = f.read()
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise DatasetError(f"not a JSON file ({e})", path=where) from None
    if looks_like_labelstudio(doc):
        return read_labelstudio_export(doc, where)
    if looks_like_coco(doc):
        return read_coco_export(doc, where)
    raise DatasetError("neither a Label Studio JSON export (a list of tasks with 'data' and "
                       "'annotations') nor a COCO json ('images', 'annotations', 'categories')",
                       path=where)


# ---- the dataset as it is --------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Given:
    """A given annotation of a reviewed image."""

    row: int  # position in the json's 'annotations'
    annotation_id: int
    category_id: int
    xywh: tuple[float, ...]
    iscrowd: bool


class _Dataset:
    """The original json, checked as `load_coco` checks it (image files aside), indexed."""

    def __init__(self, annotations: str) -> None:
        self.doc, self.where = read_coco_document(annotations)
        doc = self.doc
        _check(doc, self.where)
        self.images = {int(im["id"]): im for im in doc["images"]}
        self.by_name = {im["file_name"]: int(im["id"]) for im in doc["images"]}
        basenames: dict[str, list[int]] = {}
        for name, i in self.by_name.items():
            basenames.setdefault(name.rsplit("/", 1)[-1], []).append(i)
        self.by_basename = {b: ids[0] for b, ids in basenames.items() if len(ids) == 1}
        self.given: dict[int, list[_Given]] = {i: [] for i in self.images}
        for row, a in enumerate(doc["annotations"]):
            self.given[int(a["image_id"])].append(_Given(
                row, int(a["id"]), int(a["category_id"]), tuple(float(v) for v in a["bbox"]),
                a.get("iscrowd", 0) in (1, True)))
        cats = sorted(doc["categories"], key=lambda c: int(c["id"]))
        names = [c["name"] for c in cats]
        twice = {n for n in names if names.count(n) > 1}
        # As the exports name classes (`_suspects.class_labels`).
        self.label_of = {int(c["id"]): f"{c['name']} (id {c['id']})" if c["name"] in twice else c["name"]
                         for c in cats}
        self.category_of = {label: cid for cid, label in self.label_of.items()}
        self.next_id = max((int(a["id"]) for a in doc["annotations"]), default=0) + 1


def _check(doc: dict[str, Any], where: str) -> None:
    problems = _json.Problems()
    cat_items, image_items, ann_items = _json.sections(doc, where)
    cats = _json.parse_categories(cat_items, where, problems)
    images = _json.parse_images(image_items, where, problems)
    _json.parse_annotations(ann_items, images, np.array([c[0] for c in cats], dtype=np.int64),
                            where, problems)
    problems.raise_if_any()


# ---- applying ------------------------------------------------------------------------------------------
def apply_review(annotations: str | os.PathLike[str], review: Review) -> AppliedFixes:
    """The dataset at ``annotations`` (a COCO json, path or URI) corrected by ``review``."""
    ds = _Dataset(os.fspath(annotations))
    matched_images = [(_image_of(ds, im, review.path), im) for im in review.images]
    seen: dict[int, str] = {}
    for image_id, im in matched_images:
        if image_id in seen:
            raise fail(review.path, f"{im.item}: image {image_id} was already reviewed in {seen[image_id]}")
        seen[image_id] = im.item
    trust = _ids_are_the_datasets(ds, matched_images)
    edits: dict[int, dict[str, Any] | None] = {}  # json row -> its new record (None: deleted)
    added: list[dict[str, Any]] = []
    changes: list[Change] = []
    stale_masks = 0
    for image_id, im in matched_images:
        stale_masks += _apply_image(ds, image_id, im, review.path, trust, edits, added, changes)
    if stale_masks:
        warnings.warn(f"{stale_masks} moved box{'es keep their' if stale_masks > 1 else ' keeps its'} "
                      "segmentation, which no longer matches: review the masks too", UserWarning,
                      stacklevel=2)
    rows = [edits.get(row, a) for row, a in enumerate(ds.doc["annotations"])]
    new = {k: ([a for a in rows if a is not None] + added if k == "annotations" else v)
           for k, v in ds.doc.items()}
    try:
        _check(new, f"{ds.where} (corrected by {review.path})")
    except DatasetError as e:  # our own bug if it happens: say so rather than write it
        raise DatasetError(f"the corrected dataset would not be valid: {e.message}", path=review.path) from None
    return AppliedFixes(document=new, changes=tuple(changes), reviewed_images=len(matched_images))


def _image_of(ds: _Dataset, im: ReviewedImage, path: str) -> int:
    """The dataset's image id of a reviewed image: our id when the tool kept it, else its file
    name (as in the json, or a basename only one image has)."""
    if im.image_id is not None:
        if im.image_id not in ds.images:
            raise fail(path, f"{im.item}: image {im.image_id} is not in the dataset {ds.where}")
        return im.image_id
    name = im.file_name or ""
    found = ds.by_name.get(name)
    if found is None:
        found = ds.by_basename.get(name.rsplit("/", 1)[-1])
    if found is None:
        raise fail(path, f"{im.item}: image {name!r} is not in the dataset {ds.where}")
    want = (int(ds.images[found]["width"]), int(ds.images[found]["height"]))
    if im.size is not None and tuple(im.size) != want:
        raise fail(path, f"{im.item}: image {name!r} is {im.size[0]}x{im.size[1]} in the fixes file "
                         f"but {want[0]}x{want[1]} in the dataset: another image, or resized")
    return found


def _ids_are_the_datasets(ds: _Dataset, images: list[tuple[int, ReviewedImage]]) -> bool:
    """Whether the ids a file's boxes carry (those not surely ours) are the dataset's: every one
    is a given annotation of its own image (a tool that renumbers from 1 fails this at once)."""
    ids = [(i, b.annotation_id) for i, im in images for b in im.boxes
           if not b.id_is_ours and b.annotation_id is not None]
    if not ids:
        return False
    own = {(i, g.annotation_id) for i, _ in images for g in ds.given[i] if not g.iscrowd}
    return all(pair in own for pair in ids)


def _apply_image(ds: _Dataset, image_id: int, im: ReviewedImage, path: str, trust: bool,
                 edits: dict[int, dict[str, Any] | None], added: list[dict[str, Any]],
                 changes: list[Change]) -> int:
    """Apply one image's review; return how many moved boxes keep a segmentation."""
    record = ds.images[image_id]
    width, height = int(record["width"]), int(record["height"])
    name = str(record["file_name"])
    boxes = [(_pixels(b, width, height, image_id, path), ds.category_of.get(b.label), b) for b in im.boxes]
    for _, cid, b in boxes:
        if cid is None:
            known = sorted(ds.category_of)
            raise fail(path, f"{b.item}: class {b.label!r} is not a category of the dataset "
                             f"({', '.join(map(repr, known[:10]))}{', ...' if len(known) > 10 else ''})")
    given = [g for g in ds.given[image_id] if not g.iscrowd]
    pairs = _match(boxes, given, trust, path)
    stale = 0
    for j, (xywh, cid, b) in enumerate(boxes):
        g = pairs.get(j)
        if g is None:
            new_id, ds.next_id = ds.next_id, ds.next_id + 1
            added.append({"id": new_id, "image_id": image_id, "category_id": cid, "bbox": list(xywh),
                          "area": _area(xywh), "iscrowd": 0})
            changes.append(Change(image_id, name, new_id, "added", "", f"{ds.label_of[cid]} {_show(xywh)}"))
            continue
        moved = max(abs(a - c) for a, c in zip(xywh, g.xywh)) > MOVED_PX
        if not moved and cid == g.category_id:
            continue
        a = dict(ds.doc["annotations"][g.row])
        if cid != g.category_id:
            a["category_id"] = cid
            changes.append(Change(image_id, name, g.annotation_id, "reclassified",
                                  ds.label_of[g.category_id], ds.label_of[cid]))
        if moved:
            a["bbox"] = list(xywh)
            if a.get("segmentation"):
                stale += 1
            else:
                a["area"] = _area(xywh)
            changes.append(Change(image_id, name, g.annotation_id, "moved", _show(g.xywh), _show(xywh)))
        edits[g.row] = a
    kept = {g.annotation_id for g in pairs.values()}
    for g in given:
        if g.annotation_id not in kept:
            edits[g.row] = None
            changes.append(Change(image_id, name, g.annotation_id, "deleted",
                                  f"{ds.label_of[g.category_id]} {_show(g.xywh)}", ""))
    return stale


def _match(boxes: list[tuple[tuple[float, ...], int, ReviewedBox]], given: list[_Given],
           trust: bool, path: str) -> dict[int, _Given]:
    """Reviewed box index -> the given annotation it is: by id (its own, or the file's when
    ``trust``), then by IoU."""
    pairs: dict[int, _Given] = {}
    by_id = {g.annotation_id: g for g in given}
    taken: dict[int, str] = {}
    for j, (_, _, b) in enumerate(boxes):
        if (b.id_is_ours or trust) and b.annotation_id in by_id:
            if b.annotation_id in taken:
                raise fail(path, f"{b.item}: annotation {b.annotation_id} appears twice "
                                 f"(also {taken[b.annotation_id]})")
            taken[b.annotation_id] = b.item
            pairs[j] = by_id[b.annotation_id]
    free = [g for g in given if g.annotation_id not in taken]
    rest = [j for j in range(len(boxes)) if j not in pairs]
    # Best overlap first; ties: the earlier box, the earlier annotation.
    scored = sorted((-_iou(boxes[j][0], g.xywh), j, k) for j in rest for k, g in enumerate(free))
    used_box, used_given = set(), set()
    for negative_iou, j, k in scored:
        if -negative_iou < MATCH_IOU:
            break
        if j in used_box or k in used_given:
            continue
        used_box.add(j)
        used_given.add(k)
        pairs[j] = free[k]
    return pairs


def _pixels(b: ReviewedBox, width: int, height: int, image_id: int, path: str) -> tuple[float, ...]:
    """The box as ``[x, y, w, h]`` pixels (rounded to 0.01 px), checked inside its image (up to
    `BOX_TOLERANCE_PX` outside, then clipped)."""
    x, y, w, h = b.box
    if b.percent:
        x, y, w, h = x * width / 100.0, y * height / 100.0, w * width / 100.0, h * height / 100.0
    if not all(np.isfinite([x, y, w, h])) or w <= 0 or h <= 0:
        raise fail(path, f"{b.item}: box {_show((x, y, w, h))} has no area")
    tol = BOX_TOLERANCE_PX
    if x < -tol or y < -tol or x + w > width + tol or y + h > height + tol:
        raise fail(path, f"{b.item}: box {_show((x, y, w, h))} reaches outside its image "
                         f"{image_id} ({width}x{height})")
    x1, y1 = min(max(x, 0.0), width), min(max(y, 0.0), height)
    x2, y2 = min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)
    return tuple(_tidy(v) for v in (x1, y1, x2 - x1, y2 - y1))


def _tidy(v: float) -> float | int:
    v = round(float(v), 2)
    return int(v) if v.is_integer() else v


def _area(xywh: tuple[float, ...]) -> float | int:
    return _tidy(xywh[2] * xywh[3])


def _iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    ix = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0


def _show(xywh: tuple[float, ...]) -> str:
    return "[" + ", ".join(f"{v:g}" for v in xywh) + "]"
