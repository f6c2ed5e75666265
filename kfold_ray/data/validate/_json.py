"""Checks on a COCO detection json and its image files, run before anything is reserved.

Every problem is a one-line message that names the json field and the record at fault
(``annotations[3] (id 17): 'bbox' has negative width -4.0``) and the file at fault (the json, or
an image file that cannot be read). The checks find every problem in one pass (`Problems`):
they go on past a bad record, and `load_coco` raises one `DatasetError` that lists them all.
Only problems that make the later checks meaningless stop at once: invalid json, a missing or
empty section, a missing or duplicate id. Problems are reported in a fixed order (structure,
categories, images, annotations, files), and within a section in json order, so the same bad
input always gets the same messages.

The checks are vectorized where the json allows it: a fast pass over a whole column (set of
types, numpy comparisons) and, only when it fails, a slow pass to find each record at fault.

This module reads the json and checks its categories, images and annotations (boxes,
``iscrowd``). The other checks have a module each: `_validate_masks` (segmentations),
`_validate_files` (image files) and `_validate_jpeg` (their headers); `_validate_problems`
holds the messages and the problem collector, `_validate_locations` the file locations.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from ..._exceptions import DatasetError, one_line
from ...storage._locations import remote_info, shown
from ._image_table import ImageTable
from ._masks import Segmentations, parse_segmentations
from ._problems import _MISSING, Problems, _at, _fail, _kind, _Records, _report, show

#: How far (pixels) a box may reach outside its image and still be accepted (then clipped).
BOX_TOLERANCE_PX = 1.0

_IMAGE_KEYS = frozenset({"id", "file_name", "width", "height"})


# ---- the document -----------------------------------------------------------------------------
def read_document(fs: pafs.FileSystem, path: str, location: str) -> tuple[bytes, dict[str, Any]]:
    """The json file's bytes and its parsed top-level object.

    ``path`` is the file's path in ``fs``; ``location`` its absolute path or URI (for messages).
    """
    p = shown(location)
    if isinstance(fs, pafs.LocalFileSystem):
        try:
            raw = Path(path).read_bytes()
        except FileNotFoundError:
            raise DatasetError("annotations file not found", path=p) from None
        except IsADirectoryError:
            raise DatasetError("annotations path is a folder, not a json file", path=p) from None
        except OSError as exc:
            raise DatasetError(f"cannot read annotations file: {exc.strerror or exc}", path=p) from None
    else:
        info = remote_info(fs, path, "annotations", location)
        if info.type == pafs.FileType.NotFound:
            raise DatasetError("annotations file not found", path=p)
        if info.type != pafs.FileType.File:
            raise DatasetError("annotations path is a folder, not a json file", path=p)
        try:
            with fs.open_input_file(path) as f:
                raw = f.read()
        except (OSError, pa.ArrowException) as exc:
            raise DatasetError(f"cannot read annotations file: {one_line(exc)[:300]}", path=p) from None
    return raw, parse_document(raw, p)


def parse_document(raw: bytes, p: str) -> dict[str, Any]:
    """The json's top-level object; ``p`` names the file in messages."""
    if not raw.strip():
        raise DatasetError("annotations file is empty", path=p)
    try:
        doc = json.loads(raw)
    except json.JSONDecodeError as exc:
        # An unterminated string runs to the end of the file; other errors point at it.
        ends_early = exc.pos >= len(raw.rstrip()) or exc.msg.startswith("Unterminated string")
        hint = " (the file ends early: truncated?)" if ends_early else ""
        msg = f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}{hint}"
        raise DatasetError(msg, path=p) from None
    except UnicodeDecodeError as exc:
        raise DatasetError(f"not UTF-8 text (byte {exc.start}): {exc.reason}", path=p) from None
    if not isinstance(doc, dict):
        raise DatasetError(f"top level must be a json object, got {_kind(doc)}", path=p)
    return doc


def sections(doc: Mapping[str, Any], path: str) -> tuple[list, list, list]:
    """The ``categories``, ``images`` and ``annotations`` lists, each a list of objects."""
    out = []
    for key in ("categories", "images", "annotations"):
        value = doc.get(key, _MISSING)
        if value is _MISSING:
            raise DatasetError(f"missing top-level field {key!r}", path=path)
        if not isinstance(value, list):
            raise DatasetError(f"{key!r} must be a list, got {_kind(value)}", path=path)
        out.append(value)
    for key, items in zip(("categories", "images", "annotations"), out):
        if set(map(type, items)) - {dict}:
            i = next(i for i, it in enumerate(items) if not isinstance(it, dict))
            msg = f"{key}[{i}]: must be a json object, got {_kind(items[i])} {show(items[i])}"
            raise DatasetError(msg, path=path)
    return out[0], out[1], out[2]


# ---- columns ----------------------------------------------------------------------------------
def _int_problem(key: str, v: Any) -> str:
    if v is _MISSING:
        return f"missing {key!r}"
    if type(v) is int:
        return f"{key!r} {v} does not fit in 64 bits"
    return f"{key!r} must be an integer, got {show(v)} ({_kind(v)})"


def _int_column(
    items: list, section: str, key: str, path: str, default: Any = _MISSING
) -> np.ndarray:
    """int64 column ``key`` of ``items``: every value a json integer (not a bool, not 3.0).
    Raises at the first bad value (ids: the checks after them need them)."""
    values = [it.get(key, default) for it in items]
    if set(map(type, values)) - {int}:
        i, v = next((i, v) for i, v in enumerate(values) if type(v) is not int)
        raise _fail(path, section, i, items[i], _int_problem(key, v))
    try:
        return np.array(values, dtype=np.int64)
    except OverflowError:
        i = next(i for i, v in enumerate(values) if not -(2**63) <= v < 2**63)
        raise _fail(path, section, i, items[i], _int_problem(key, values[i])) from None


def _int_values(items: list, key: str, found: _Records) -> tuple[np.ndarray, np.ndarray]:
    """int64 column ``key`` (0 where bad) and a mask of the records where it is a valid json
    integer; each bad one is a problem in ``found``."""
    values = [it.get(key, _MISSING) for it in items]
    if not set(map(type, values)) - {int}:
        try:
            return np.array(values, dtype=np.int64), np.ones(len(values), dtype=bool)
        except OverflowError:
            pass
    ok = [type(v) is int and -(2**63) <= v < 2**63 for v in values]
    for i in (i for i, good in enumerate(ok) if not good):
        found.one(i, _int_problem(key, values[i]))
    column = np.array([v if good else 0 for v, good in zip(values, ok)], dtype=np.int64)
    return column, np.array(ok, dtype=bool)


def _check_unique(ids: np.ndarray, items: list, section: str, what: str, path: str) -> None:
    order = np.argsort(ids, kind="stable")
    ranked = ids[order]
    dup = np.flatnonzero(ranked[1:] == ranked[:-1])
    if dup.size:
        j = int(order[dup + 1].min())  # stable sort: the later record of each equal pair
        first = int(np.flatnonzero(ids == ids[j])[0])
        problem = f"duplicate {what} id, first used by {section}[{first}]"
        raise _fail(path, section, j, items[j], problem)


def _index_of(keys: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Position of each value in ``keys`` (unique), and a mask of values found there."""
    order = np.argsort(keys, kind="stable")
    ranked = keys[order]
    pos = np.clip(np.searchsorted(ranked, values), 0, max(len(ranked) - 1, 0))
    found = ranked[pos] == values if len(ranked) else np.zeros(len(values), dtype=bool)
    return order[pos], found


# ---- categories -------------------------------------------------------------------------------
def parse_categories(items: list, path: str, problems: Problems | None = None
                     ) -> list[tuple[int, str, str | None]]:
    """(id, name, supercategory) of each category, sorted by id (position = class index).

    Missing or duplicate ids stop at once; other problems go to ``problems`` (raised here
    when it is None)."""
    if not items:
        raise DatasetError("'categories' is empty: a detector needs at least one class", path=path)
    ids = _int_column(items, "categories", "id", path)
    _check_unique(ids, items, "categories", "category", path)
    found = _Records("categories", items, path)
    cats = []
    for i, (cid, it) in enumerate(zip(ids.tolist(), items)):
        name = it.get("name", _MISSING)
        if name is _MISSING:
            found.one(i, "missing 'name'")
        elif not isinstance(name, str) or not name.strip():
            found.one(i, f"'name' must be a non-empty string, got {show(name)}")
        sup = it.get("supercategory")
        if sup is not None and not isinstance(sup, str):
            found.one(i, f"'supercategory' must be a string, got {show(sup)}")
        cats.append((int(cid), name if isinstance(name, str) else "",
                     sup if isinstance(sup, str) else None))
    _report(found, problems)
    return sorted(cats, key=lambda c: c[0])


# ---- images -----------------------------------------------------------------------------------
def parse_images(items: list, path: str, problems: Problems | None = None) -> ImageTable:
    """The images; missing or duplicate ids stop at once, other problems go to ``problems``
    (raised here when it is None)."""
    if not items:
        raise DatasetError("'images' is empty: the dataset has no images", path=path)
    ids = _int_column(items, "images", "id", path)
    _check_unique(ids, items, "images", "image", path)
    found = _Records("images", items, path)
    names, name_ok = _file_names(items, found)
    sizes, size_ok = [], np.ones(len(items), dtype=bool)
    for key in ("width", "height"):
        col, ok = _int_values(items, key, found)
        bad = ok & (col <= 0)
        found.add(bad, lambda i, key=key, col=col: f"{key!r} must be positive, got {col[i]}")
        size_ok &= ok & ~bad
        sizes.append(col)
    _report(found, problems)
    extras = tuple({k: v for k, v in it.items() if k not in _IMAGE_KEYS} for it in items)
    return ImageTable(ids, names, sizes[0], sizes[1], extras, name_ok, size_ok)


def _file_names(items: list, found: _Records) -> tuple[tuple[str, ...], np.ndarray]:
    """Each ``file_name`` ("" where bad), and a mask of the valid ones: a non-empty relative
    path that stays inside the image root, used once."""
    seen: dict[str, int] = {}
    names, ok = [], np.ones(len(items), dtype=bool)
    for i, it in enumerate(items):
        name = it.get("file_name", _MISSING)
        problem = "missing 'file_name'" if name is _MISSING else _file_name_problem(name)
        if problem is None:
            odd = "./" in name or "//" in name or name[-1] in "/."
            key = os.path.normpath(name) if odd else name
            if key in seen:
                j = seen[key]
                problem = f"'file_name' {show(name)} is also used by {_at('images', j, items[j])}"
            seen[key] = i
        if problem:
            found.one(i, problem)
            ok[i] = False
        names.append(name if isinstance(name, str) else "")
    return tuple(names), ok


def _file_name_problem(name: Any) -> str | None:
    # Plain string tests, not pathlib: this runs once per image (pathlib took 30 us per name).
    if not isinstance(name, str):
        return f"'file_name' must be a string, got {show(name)} ({_kind(name)})"
    if not name.strip():
        return "'file_name' is empty"
    if "\x00" in name:
        return f"'file_name' {show(name)} contains a NUL character"
    drive = len(name) > 1 and name[1] == ":" and name[0].isascii() and name[0].isalpha()
    if name[0] in "/\\" or drive:
        return f"'file_name' {show(name)} is absolute; it must be relative to the image root"
    # Lexical check, on purpose: a symlinked image folder inside the root is a common set-up.
    if ".." in name and os.path.normpath(name).split("/")[0] == "..":
        return f"'file_name' {show(name)} escapes the image root with '..'"
    return None


# ---- annotations ------------------------------------------------------------------------------
@dataclass(frozen=True)
class AnnotationTable:
    """Annotations grouped per image (CSR), json order within an image."""

    offsets: np.ndarray  # int64 (N + 1,)
    ids: np.ndarray  # int64 (M,)
    boxes: np.ndarray  # float32 (M, 4) xyxy, clipped to the image
    classes: np.ndarray  # int64 (M,)
    iscrowd: np.ndarray  # bool (M,)
    segmentations: "Segmentations | None" = None  # rows aligned with the above
    json_index: np.ndarray | None = None  # int64 (M,): position in the json's 'annotations'
    #: bool (M,): 'segmentation' present but null or [] (for messages)
    empty_segmentation: np.ndarray | None = None

    def take_images(self, keep: np.ndarray) -> "AnnotationTable":
        """The annotations of the images where the bool mask ``keep`` is set."""
        counts = np.diff(self.offsets)
        rows = np.flatnonzero(np.repeat(keep, counts))
        offsets = np.concatenate([[0], np.cumsum(counts[keep])]).astype(np.int64)
        opt = lambda a: None if a is None else a[rows]  # noqa: E731
        return AnnotationTable(
            offsets, self.ids[rows], self.boxes[rows], self.classes[rows], self.iscrowd[rows],
            None if self.segmentations is None else self.segmentations.take(rows),
            opt(self.json_index), opt(self.empty_segmentation),
        )


def parse_annotations(
    items: list, images: ImageTable, category_ids: np.ndarray, path: str,
    problems: Problems | None = None,
) -> AnnotationTable | None:
    """``category_ids``: int64 (C,) sorted; a category's class index is its position there.

    Missing or duplicate ids stop at once; every other problem goes to ``problems`` (raised here
    when it is None), and then the table is None."""
    own = problems is None
    problems = Problems() if own else problems
    table = _parse_annotations(items, images, category_ids, path, problems)
    if own:
        problems.raise_if_any()
    return table


def _parse_annotations(items: list, images: ImageTable, category_ids: np.ndarray, path: str,
                       problems: Problems) -> AnnotationTable | None:
    if not items:
        problems.add("'annotations' is empty: nothing to train on", path)
        return None
    sec = "annotations"
    ids = _int_column(items, sec, "id", path)
    _check_unique(ids, items, sec, "annotation", path)
    found = _Records(sec, items, path)
    image_ids, image_ok = _int_values(items, "image_id", found)
    image_of, known = _index_of(images.ids, image_ids)
    found.add(image_ok & ~known, lambda i: f"'image_id' {items[i]['image_id']} is not in 'images'")
    image_ok &= known
    category, category_ok = _int_values(items, "category_id", found)
    classes, known = _index_of(category_ids, category)
    found.add(category_ok & ~known,
              lambda i: f"'category_id' {items[i]['category_id']} is not in 'categories'")
    # Boxes and masks are checked against their image when it is known and has a valid size.
    sized = image_ok & (True if images.size_ok is None else images.size_ok[image_of])
    boxes = _boxes(items, images, image_of, sized, found)
    crowd = _iscrowd(items, found)
    # Mask problems are kept apart: only a model that trains masks needs them fixed.
    mask_found = _Records(sec, items, path)
    segmentations, empty = parse_segmentations(items, images, image_of, sized, mask_found)
    if found:
        found.report(problems)
        return None
    if mask_found:
        mask_problems = Problems()
        mask_found.report(mask_problems)
        segmentations = dataclasses.replace(segmentations, problems=tuple(mask_problems.lines),
                                            problem_count=mask_problems.count)
    if crowd.all():
        problems.add(f"all {len(items)} annotations are crowd ('iscrowd': 1): nothing to train on", path)
        return None
    order = np.argsort(image_of, kind="stable")  # group by image, json order inside
    counts = np.bincount(image_of, minlength=len(images.ids))
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    classes = classes[order].astype(np.int64)
    return AnnotationTable(offsets, ids[order], boxes[order], classes, crowd[order],
                           segmentations.take(order), order.astype(np.int64), empty[order])


def _bbox_shape_problem(b: Any) -> str | None:
    if b is _MISSING:
        return "missing 'bbox'"
    if not isinstance(b, list) or len(b) != 4:
        return f"'bbox' must be a list of 4 numbers [x, y, width, height], got {show(b)}"
    if any(type(v) not in (int, float) for v in b):
        return f"'bbox' must hold 4 numbers [x, y, width, height], got {show(b)}"
    return None


def _boxes(items: list, images: ImageTable, image_of: np.ndarray, sized: np.ndarray,
           found: _Records) -> np.ndarray:
    """float32 (M, 4) xyxy boxes, checked against and clipped to their image."""
    sec_bbox = lambda i: show(items[i]["bbox"])  # noqa: E731
    bbs = [it.get("bbox", _MISSING) for it in items]
    good = np.ones(len(bbs), dtype=bool)
    fast_ok = (
        set(map(type, bbs)) == {list}
        and set(map(len, bbs)) == {4}
        and not set(map(type, chain.from_iterable(bbs))) - {int, float}
    )
    if not fast_ok:
        for i, b in enumerate(bbs):
            if (problem := _bbox_shape_problem(b)) is not None:
                found.one(i, problem)
                good[i] = False
        bbs = [b if g else [0, 0, 1, 1] for b, g in zip(bbs, good.tolist())]
    try:
        xywh = np.array(bbs, dtype=np.float64).reshape(-1, 4)
    except OverflowError:  # an integer beyond float range: not finite, as json's 1e999 would be
        xywh = np.array([[_as_float(v) for v in b] for b in bbs], dtype=np.float64).reshape(-1, 4)
    with np.errstate(over="ignore", invalid="ignore"):
        bad = good & ~np.isfinite(xywh).all(axis=1)
        found.add(bad, lambda i: f"'bbox' {sec_bbox(i)} is not finite")
        good &= ~bad
        for col, what in ((2, "width"), (3, "height")):
            bad = good & (xywh[:, col] <= 0)

            def problem(i, col=col, what=what):
                v = xywh[i, col]
                return f"'bbox' {sec_bbox(i)} " + (f"has zero {what}" if v == 0 else f"has negative {what} {v}")

            found.add(bad, problem)
            good &= ~bad
        x1, y1 = xywh[:, 0], xywh[:, 1]
        x2, y2 = x1 + xywh[:, 2], y1 + xywh[:, 3]
        w = images.widths[image_of].astype(np.float64)
        h = images.heights[image_of].astype(np.float64)
        tol = BOX_TOLERANCE_PX
        outside = (x1 < -tol) | (y1 < -tol) | (x2 > w + tol) | (y2 > h + tol)
        xyxy = np.stack([np.clip(x1, 0, w), np.clip(y1, 0, h), np.clip(x2, 0, w), np.clip(y2, 0, h)], 1)
        empty = (xyxy[:, 2] <= xyxy[:, 0]) | (xyxy[:, 3] <= xyxy[:, 1])
    checked = good & sized
    for mask, how in ((outside, f"reaches more than {tol:g} px outside"), (empty, "lies outside")):
        bad = checked & mask

        def problem(i, how=how):
            k = int(image_of[i])
            img = f"image {images.ids[k]} ({images.widths[k]}x{images.heights[k]})"
            return f"'bbox' {sec_bbox(i)} {how} its {img}"

        found.add(bad, problem)
        checked &= ~bad
    return xyxy.astype(np.float32)


def _as_float(v: int | float) -> float:
    try:
        return float(v)
    except OverflowError:
        return float("inf")


def _iscrowd(items: list, found: _Records) -> np.ndarray:
    values = [it.get("iscrowd", 0) for it in items]
    if set(map(type, values)) - {int, bool} or set(values) - {0, 1}:
        for i, v in enumerate(values):
            if type(v) not in (int, bool) or v not in (0, 1):
                found.one(i, f"'iscrowd' must be 0 or 1, got {show(v)}")
                values[i] = 0
    return np.array(values, dtype=bool)


# ---- soft problems ----------------------------------------------------------------------------
def soft_problems(
    categories: Sequence[tuple[int, str, str | None]], anns: AnnotationTable
) -> list[str]:
    """Things that do not stop a run but that the user should hear about (one line each)."""
    out = []
    counts = np.bincount(anns.classes[~anns.iscrowd], minlength=len(categories))
    empty = [f"{cid} {show(name)}" for (cid, name, _), n in zip(categories, counts) if n == 0]
    if empty:
        listed = ", ".join(empty[:10]) + (f" and {len(empty) - 10} more" if len(empty) > 10 else "")
        have = "category has" if len(empty) == 1 else "categories have"
        out.append(f"{len(empty)} {have} no (non-crowd) annotations, so the model will never "
                   f"learn them: {listed}")  # fmt: skip
    names = [name for _, name, _ in categories]
    twice = sorted({n for n in names if names.count(n) > 1}) if len(set(names)) < len(names) else []
    if twice:
        out.append(f"category names used by more than one id: {', '.join(map(show, twice))}")
    return out
