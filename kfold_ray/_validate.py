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
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import posixpath
import re
import stat
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from ._exceptions import DatasetError, StorageError
from ._storage import is_uri

#: How far (pixels) a box may reach outside its image and still be accepted (then clipped).
BOX_TOLERANCE_PX = 1.0

_IMAGE_KEYS = frozenset({"id", "file_name", "width", "height"})
_MISSING = object()
_JSON_TYPE = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array",
              dict: "object", type(None): "null"}  # fmt: skip


# ---- messages ---------------------------------------------------------------------------------
def show(value: Any, limit: int = 60) -> str:
    """``value`` as the json spells it, on one line, shortened to about ``limit`` characters."""
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    text = " ".join(text.splitlines())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _kind(value: Any) -> str:
    return _JSON_TYPE.get(type(value), type(value).__name__)


def _at(section: str, i: int, item: Any) -> str:
    """``images[2] (id 9)``: the record's position, and its id when it has a valid one."""
    rid = item.get("id") if isinstance(item, dict) else None
    return f"{section}[{i}] (id {rid})" if type(rid) is int else f"{section}[{i}]"


def _fail(path: str, section: str, i: int, item: Any, problem: str) -> DatasetError:
    return DatasetError(f"{_at(section, i, item)}: {problem}", path=path)


# ---- storage ----------------------------------------------------------------------------------
# The annotations json and the images may sit on a local disk (or a mount) or behind any
# ``pyarrow.fs`` filesystem (an object store): local files are read with plain os calls, the
# others through the filesystem; every message names the file by its absolute path or URI.
_CREDENTIAL_IN_QUERY = re.compile(r"((?:secret_key|session_token|access_key)=)[^&#]*", re.I)
_MISSING_BUCKET_FS = frozenset({"s3", "gcs"})  # stores whose first path component is a bucket


def shown(location: str) -> str:
    """``location`` for messages: credentials given in a URI's ``?query`` are masked."""
    return _CREDENTIAL_IN_QUERY.sub(r"\1***", location) if "?" in location else location


def _split_query(location: str) -> tuple[str, str]:
    if "?" in location and is_uri(location):
        base, query = location.split("?", 1)
        return base, "?" + query
    return location, ""


def join(root: str, name: str) -> str:
    """``root/name`` for a folder path, filesystem path or URI (a URI's ``?query`` stays last).

    ``name`` is relative (checked by `parse_images`); one with ``.`` or empty parts is
    normalized, as a local OS would resolve it and as object keys are usually written.
    """
    if "./" in name or "//" in name or name.endswith(("/", ".")):
        name = posixpath.normpath(name)
    base, query = _split_query(root)
    return f"{base.rstrip('/')}/{name}{query}"


def parent(location: str) -> str:
    """The folder of a file's absolute path or URI."""
    base, query = _split_query(location)
    if not is_uri(base):
        return os.path.dirname(base) or "/"
    return base.rstrip("/").rsplit("/", 1)[0] + query


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _missing_bucket(fs: pafs.FileSystem, path: str) -> str | None:
    """The bucket of ``path`` if the store has no such bucket (else None: the key is missing)."""
    if fs.type_name not in _MISSING_BUCKET_FS:
        return None
    bucket = path.split("/", 1)[0]
    try:
        return bucket if fs.get_file_info(bucket).type == pafs.FileType.NotFound else None
    except (OSError, pa.ArrowException):
        return None


def remote_info(fs: pafs.FileSystem, path: str, what: str, location: str) -> pafs.FileInfo:
    """``fs.get_file_info(path)``; StorageError (one line naming ``location``) when the store
    cannot be reached (credentials, endpoint, network) or the bucket does not exist."""
    try:
        info = fs.get_file_info(path)
    except (OSError, pa.ArrowException) as e:
        raise StorageError(f"{what} {shown(location)}: cannot read the storage ({_one_line(e)[:300]}); "
                           "check its credentials and endpoint") from None  # fmt: skip
    if info.type == pafs.FileType.NotFound and (bucket := _missing_bucket(fs, path)):
        raise StorageError(f"{what} {shown(location)}: bucket {bucket!r} does not exist")
    return info


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
            raise DatasetError(f"cannot read annotations file: {_one_line(exc)[:300]}", path=p) from None
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


# ---- collecting problems ----------------------------------------------------------------------
MAX_PROBLEMS = DatasetError.MAX_PROBLEMS


class Problems:
    """The problems found so far, in check order: the first `MAX_PROBLEMS` as lines
    (``"<file>: <problem>"``), the first one's message and file, and how many in all."""

    def __init__(self) -> None:
        self.first: tuple[str, str] | None = None
        self.lines: list[str] = []
        self.count = 0

    def __bool__(self) -> bool:
        return self.count > 0

    @property
    def room(self) -> int:
        return max(0, MAX_PROBLEMS - len(self.lines))

    def add(self, message: str, path: str) -> None:
        self.count += 1
        if self.first is None:
            self.first = (message, path)
        if len(self.lines) < MAX_PROBLEMS:
            self.lines.append(f"{path}: {message}")

    def error(self) -> DatasetError:
        assert self.first is not None
        message, path = self.first
        return DatasetError(message, path=path, problems=self.lines, problem_count=self.count)

    def raise_if_any(self) -> None:
        if self:
            raise self.error()


class _Records:
    """Problems of one section's records, found check by check (a check may be vectorized:
    ``add(rows, problem_of_row)``) and reported in record order, then check order. Messages are
    only built for the problems that are shown."""

    def __init__(self, section: str, items: list, path: str) -> None:
        self.section, self.items, self.path = section, items, path
        self._batches: list[tuple[np.ndarray, int, Any]] = []  # (rows, check number, row -> problem)
        self._singles: list[tuple[int, int, str]] = []  # (row, check number, problem)
        self._checks = 0

    def add(self, rows: Any, problem) -> None:
        """``problem(i) -> str`` for each row ``i`` of ``rows`` (an index array or a bool mask)."""
        rows = np.asarray(rows)
        rows = np.flatnonzero(rows) if rows.dtype == bool else rows.astype(np.int64).reshape(-1)
        if rows.size:
            self._batches.append((rows, self._checks, problem))
        self._checks += 1

    def one(self, i: int, problem: str) -> None:
        self._singles.append((i, self._checks, problem))
        self._checks += 1

    def __bool__(self) -> bool:
        return bool(self._singles or self._batches)

    def report(self, problems: Problems) -> None:
        if not self:
            return
        rows = np.concatenate([b[0] for b in self._batches] + [np.array([s[0] for s in self._singles], np.int64)])
        check = np.concatenate([np.full(b[0].size, b[1], np.int64) for b in self._batches]
                               + [np.array([s[1] for s in self._singles], np.int64)])
        which = np.concatenate([np.full(b[0].size, k, np.int64) for k, b in enumerate(self._batches)]
                               + [-1 - np.arange(len(self._singles), dtype=np.int64)])
        order = np.lexsort((check, rows))
        shown_now = order[: problems.room]
        for j in shown_now.tolist():
            i, w = int(rows[j]), int(which[j])
            text = self._batches[w][2](i) if w >= 0 else self._singles[-1 - w][2]
            problems.add(f"{_at(self.section, i, self.items[i])}: {text}", self.path)
        problems.count += int(order.size - shown_now.size)


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


def _report(found: _Records, problems: Problems | None) -> None:
    if problems is None:
        own = Problems()
        found.report(own)
        own.raise_if_any()
    else:
        found.report(problems)


# ---- images -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ImageTable:
    ids: np.ndarray  # int64 (N,), file order
    file_names: tuple[str, ...]
    widths: np.ndarray
    heights: np.ndarray
    extras: tuple[dict[str, Any], ...]
    #: bool (N,): the file name is valid (its file can be checked); None: all are.
    name_ok: np.ndarray | None = None
    #: bool (N,): width and height are valid (boxes and the file can be checked against them).
    size_ok: np.ndarray | None = None

    def take(self, keep: np.ndarray) -> "ImageTable":
        """The images where the bool mask ``keep`` is set."""
        names = tuple(n for n, k in zip(self.file_names, keep.tolist()) if k)
        extras = tuple(e for e, k in zip(self.extras, keep.tolist()) if k)
        return ImageTable(self.ids[keep], names, self.widths[keep], self.heights[keep], extras)


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
    segmentations, empty = parse_segmentations(items, images, image_of, sized, found)
    if found:
        found.report(problems)
        return None
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


# ---- segmentations (masks) --------------------------------------------------------------------
NO_MASK, POLYGONS, RLE = 0, 1, 2


@dataclass(frozen=True, eq=False)
class Segmentations:
    """Each annotation's COCO ``segmentation``, packed in a few arrays (cheap to pickle; no
    Python object per polygon). Row ``r`` is annotation row ``r`` of the dataset.

    Attributes:
        kind: uint8 (M,): `NO_MASK`, `POLYGONS` or `RLE`.
        polygon_offsets: int64 (M + 1,): row ``r``'s polygons are ``polygon_offsets[r]:[r + 1]``.
        coord_offsets: int64 (P + 1,): polygon ``p`` is ``coords[coord_offsets[p]:[p + 1]]``.
        coords: float32 (C,): the polygons' flat ``x, y, x, y, ...``.
        rle_index: int64 (M,): row -> position in the RLE fields, -1 for none.
        rle_sizes: int64 (R, 2): each RLE's ``[height, width]``.
        rle_counts: R compressed RLE strings (as in the json) or int64 arrays of run lengths.
        missing: one line naming the first non-crowd annotation without a segmentation (json
            order), None when every non-crowd annotation has one.
    """

    kind: np.ndarray
    polygon_offsets: np.ndarray
    coord_offsets: np.ndarray
    coords: np.ndarray
    rle_index: np.ndarray
    rle_sizes: np.ndarray
    rle_counts: tuple[Any, ...]
    missing: str | None = None

    def __len__(self) -> int:
        return int(self.kind.shape[0])

    def get(self, row: int) -> list[list[float]] | dict[str, Any] | None:
        """Row ``row`` in COCO's json form: a list of polygons, or an RLE ``{"size": [h, w],
        "counts": str | list[int]}``; None when it has none."""
        kind = int(self.kind[row])
        if kind == POLYGONS:
            co = self.coord_offsets
            lo, hi = int(self.polygon_offsets[row]), int(self.polygon_offsets[row + 1])
            return [self.coords[co[p]:co[p + 1]].tolist() for p in range(lo, hi)]
        if kind == RLE:
            j = int(self.rle_index[row])
            counts = self.rle_counts[j]
            return {"size": self.rle_sizes[j].tolist(),
                    "counts": counts if isinstance(counts, str) else counts.tolist()}
        return None

    def take(self, rows: np.ndarray) -> "Segmentations":
        """The rows ``rows`` (int indices), in that order."""
        rows = np.asarray(rows, dtype=np.int64)
        polygon_offsets, polygons = _ranges(self.polygon_offsets, rows)
        coord_offsets, coords = _ranges(self.coord_offsets, polygons)
        picked = self.rle_index[rows]
        has = picked >= 0
        rle_index = np.full(rows.size, -1, dtype=np.int64)
        rle_index[has] = np.arange(int(has.sum()), dtype=np.int64)
        return Segmentations(
            self.kind[rows], polygon_offsets, coord_offsets, self.coords[coords], rle_index,
            self.rle_sizes[picked[has]].reshape(-1, 2),
            tuple(self.rle_counts[j] for j in picked[has].tolist()), self.missing,
        )


def _ranges(offsets: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(new CSR offsets, element indices) of the ranges ``offsets[r]:offsets[r + 1]`` of ``rows``."""
    starts = offsets[rows]
    lengths = offsets[rows + 1] - starts
    new = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    index = np.repeat(starts - new[:-1], lengths) + np.arange(int(new[-1]), dtype=np.int64)
    return new, index.astype(np.int64)


def parse_segmentations(items: list, images: ImageTable, image_of: np.ndarray, sized: np.ndarray,
                        found: _Records) -> tuple[Segmentations, np.ndarray]:
    """Each annotation's ``segmentation`` (json order), checked: a list of polygons, each a flat
    list of at least 6 finite numbers, x and y alternating; or an RLE object whose ``size`` is
    its image's ``[height, width]`` and whose ``counts`` (run lengths, or COCO's compressed
    string) cover exactly that many pixels. Absent, null or ``[]``: no mask. Also returns a bool
    mask of the null or ``[]`` ones (for messages)."""
    segs = [it.get("segmentation") for it in items]
    n = len(segs)
    kind = np.zeros(n, dtype=np.uint8)
    empty = np.array([s is None or s == [] for s in segs], dtype=bool)
    empty &= np.array(["segmentation" in it for it in items], dtype=bool)
    poly_rows = [i for i, s in enumerate(segs) if type(s) is list and s]
    rle_rows = [i for i, s in enumerate(segs) if type(s) is dict]
    for i, s in enumerate(segs):
        if s is not None and type(s) not in (list, dict):
            found.one(i, "'segmentation' must be a list of polygons or an RLE object "
                         f"{{\"size\", \"counts\"}}, got {show(s)} ({_kind(s)})")
    coords = _polygon_coords(segs, poly_rows)
    if coords is None:  # a bad polygon somewhere: find each, keep the good ones
        good = []
        for i in poly_rows:
            if (problem := _polygon_problem(segs[i])) is not None:
                found.one(i, problem)
            else:
                good.append(i)
        poly_rows = good
        coords = _polygon_coords(segs, poly_rows)
        assert coords is not None
    counts_per_row = np.zeros(n, dtype=np.int64)
    counts_per_row[poly_rows] = [len(segs[i]) for i in poly_rows]
    kind[poly_rows] = POLYGONS
    lengths = np.fromiter((len(p) for i in poly_rows for p in segs[i]), dtype=np.int64)
    rle_index = np.full(n, -1, dtype=np.int64)
    sizes, runs = [], []
    for i in rle_rows:
        want = None
        if sized[i]:
            k = int(image_of[i])
            want = (int(images.ids[k]), int(images.widths[k]), int(images.heights[k]))
        problem, counts = _rle_problem(segs[i], want)
        if problem is not None:
            found.one(i, problem)
            continue
        rle_index[i] = len(sizes)
        sizes.append(segs[i]["size"])
        runs.append(counts)
        kind[i] = RLE
    table = Segmentations(
        kind=kind,
        polygon_offsets=np.concatenate([[0], np.cumsum(counts_per_row)]).astype(np.int64),
        coord_offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        coords=coords,
        rle_index=rle_index,
        rle_sizes=np.array(sizes, dtype=np.int64).reshape(-1, 2),
        rle_counts=tuple(runs),
    )
    return table, empty


def _polygon_coords(segs: list, rows: list[int]) -> np.ndarray | None:
    """float32 flat coordinates of the polygons of ``rows``; None if any polygon is bad."""
    polys = list(chain.from_iterable(segs[i] for i in rows))
    if set(map(type, polys)) - {list}:
        return None
    lengths = np.fromiter(map(len, polys), dtype=np.int64, count=len(polys))
    if (lengths < 6).any() or (lengths % 2).any():
        return None
    flat = list(chain.from_iterable(polys))
    if set(map(type, flat)) - {int, float}:
        return None
    try:
        coords = np.array(flat, dtype=np.float64)
    except OverflowError:
        return None
    if not np.isfinite(coords).all() or (np.abs(coords) > np.finfo(np.float32).max).any():
        return None
    return coords.astype(np.float32)


def _polygon_problem(seg: list) -> str | None:
    if all(type(v) in (int, float) for v in seg):
        return ("'segmentation' must be a list of polygons [[x1, y1, x2, y2, ...], ...], got a "
                f"flat list of numbers {show(seg)}: put each polygon in a list of its own")
    for p, poly in enumerate(seg):
        what = f"'segmentation' polygon {p}"
        if type(poly) is not list:
            return f"{what} must be a list of numbers [x1, y1, x2, y2, ...], got {show(poly)}"
        if any(type(v) not in (int, float) for v in poly):
            return f"{what} must hold numbers only, got {show(poly)}"
        if len(poly) < 6:
            return f"{what} has {len(poly)} numbers; a polygon needs at least 3 points (6 numbers)"
        if len(poly) % 2:
            return f"{what} has an odd count of numbers ({len(poly)}); it must be x, y pairs"
        try:
            finite = all(abs(float(v)) <= float(np.finfo(np.float32).max) for v in poly)
        except OverflowError:
            finite = False
        if not finite:
            return f"{what} {show(poly)} is not finite"
    return None


def _rle_problem(seg: dict, image: tuple[int, int, int] | None) -> tuple[str | None, Any]:
    """(problem or None, the run lengths: a str as given, or an int64 array) of an RLE object;
    ``image``: (id, width, height) of its image, when known."""
    size, counts = seg.get("size", _MISSING), seg.get("counts", _MISSING)
    if size is _MISSING:
        return "'segmentation' RLE object is missing 'size' ([height, width])", None
    if counts is _MISSING:
        return "'segmentation' RLE object is missing 'counts'", None
    if (type(size) is not list or len(size) != 2 or any(type(v) is not int for v in size)
            or min(size) <= 0):
        return f"'segmentation' RLE 'size' must be [height, width], 2 positive integers, got {show(size)}", None
    h, w = size
    if image is not None and (h, w) != (image[2], image[1]):
        return (f"'segmentation' RLE 'size' {show(size)} does not match its image {image[0]} "
                f"({image[1]}x{image[2]}), whose [height, width] is [{image[2]}, {image[1]}]"), None
    if type(counts) is str:
        total = rle_string_total(counts)
        if total is None:
            return f"'segmentation' RLE 'counts' {show(counts)} is not a valid compressed RLE string", None
        runs: Any = counts
    elif type(counts) is list:
        if set(map(type, counts)) - {int} or (counts and min(counts) < 0):
            return f"'segmentation' RLE 'counts' must be non-negative integers, got {show(counts)}", None
        try:
            runs = np.array(counts, dtype=np.int64)
        except OverflowError:
            return f"'segmentation' RLE 'counts' {show(counts)} does not fit in 64 bits", None
        total = sum(counts)
    else:
        return ("'segmentation' RLE 'counts' must be a list of run lengths or a compressed RLE "
                f"string, got {show(counts)} ({_kind(counts)})"), None
    if total != h * w:
        return (f"'segmentation' RLE 'counts' cover {total} pixels, not height x width = "
                f"{h}x{w} = {h * w}"), None
    return None, runs


def rle_string_total(s: str) -> int | None:
    """Pixels covered by a compressed COCO RLE string (pycocotools' ``rleFrString`` format);
    None when it is not one: a character outside ``0``..``o``, a value cut off at the end, a
    negative run length."""
    if not s:
        return 0
    try:
        c = np.frombuffer(s.encode("ascii"), dtype=np.uint8).astype(np.int64) - 48
    except UnicodeEncodeError:
        return None
    if c.min() < 0 or c.max() > 63:
        return None
    more = (c & 0x20) != 0
    if more[-1]:
        return None  # the last value is cut off
    ends = np.flatnonzero(~more)  # last character of each value
    starts = np.concatenate([[0], ends[:-1] + 1])
    width = ends - starts + 1
    if width.max() > 12:  # 60 bits: no real image has runs that long
        return None
    k = np.arange(c.size) - np.repeat(starts, width)  # position within its value
    x = np.add.reduceat((c & 0x1F) << (5 * k), starts)
    negative = (c[ends] & 0x10) != 0
    x = np.where(negative, x - (np.int64(1) << (5 * width)), x)
    # Each value from the 4th on is a difference to the value two before (pycocotools' n > 2).
    counts = x.copy()
    for parity in (0, 1):
        first = 2 if parity == 0 else 1
        chain_ = counts[first::2]
        counts[first::2] = np.cumsum(chain_)
    if (counts < 0).any():
        return None
    return int(counts.sum())


# ---- image files ------------------------------------------------------------------------------
_CHUNK = 64
_SWAPS_SIDES = {5, 6, 7, 8}  # EXIF orientations that Detectron2's read_image turns by 90 degrees
#: Bytes read from the start of a JPEG for its header (markers up to the start of scan: size,
#: EXIF). Read more, up to the whole file, when the header runs past them (large ICC/XMP/EXIF).
HEAD_BYTES = 64 << 10
_GROW_BYTES = 1 << 20
#: Bytes read from the end of a JPEG for its end-of-image marker.
TAIL_BYTES = 1024
#: On a remote store a file up to this size is read in one request (HEAD + GET, instead of HEAD +
#: head + tail): a request costs a round trip (~20 ms on S3), and 64 threads moving 256 KiB
#: each per ~40 ms stay well under a node's bandwidth. COCO's JPEGs average ~160 KB.
REMOTE_WHOLE_BYTES = 256 << 10
_JPEG_MAGIC = b"\xff\xd8\xff"
#: Threads for the file checks: local files are cheap, remote stores are latency-bound.
LOCAL_THREADS = min(16, 4 * (os.cpu_count() or 1))
REMOTE_THREADS = 64
#: Requests one pyarrow S3 client keeps in flight (the AWS SDK's default connection pool): the
#: remote check opens one filesystem per this many threads.
REMOTE_CONNECTIONS = 25


class ImageFiles:
    """The files under an image root: a local folder (or mount), or a folder of a pyarrow
    filesystem (``s3://bucket/prefix``, ...).

    Attributes:
        fs: the filesystem; root: the folder's path in it; location: its absolute path or URI.
    """

    def __init__(self, fs: pafs.FileSystem, root: str, location: str) -> None:
        self.fs, self.root, self.location = fs, root, location
        self.local = isinstance(fs, pafs.LocalFileSystem)

    def path(self, name: str) -> str:
        """The path of image ``name`` in ``fs``."""
        return join(self.root, name)

    def location_of(self, name: str) -> str:
        """Image ``name`` as an absolute path or URI, for messages."""
        return shown(join(self.location, name))

    def read_bytes(self, name: str) -> bytes:
        """The whole file (raises OSError / FileNotFoundError as the filesystem does)."""
        if self.local:
            with open(self.path(name), "rb") as f:
                return f.read()
        with self.fs.open_input_file(self.path(name)) as f:
            return f.read()


class FileFault(NamedTuple):
    """An image whose file is at fault: ``problem`` is one line without the ``images[i] (id
    ...)`` prefix; ``path`` the file to name (the image's location when the file itself is bad,
    else the json); ``unreadable``: the file is missing, not a file, corrupt or cannot be read
    (not: its size differs from the json's, a problem of the json)."""

    index: int
    problem: str
    path: str
    unreadable: bool


def check_image_files(files: ImageFiles, images: ImageTable, *, decode: bool, path: str,
                      faults: list[FileFault] | None = None) -> np.ndarray:
    """int64 (N,) byte size of each image file (-1 where at fault).

    Always looks every file up (missing file, not a file). With ``decode``, also reads each
    one's header: readable, size (after EXIF rotation, as Detectron2 reads it) equal to the
    json's; a JPEG must end with its end-of-image marker (a ranged read of its last bytes); a PNG
    is read whole for ``verify()`` (every chunk's CRC). On a remote store, files up to
    `REMOTE_WHOLE_BYTES` are read in one request instead of two ranged ones. Pixels are never
    decoded. Runs in a thread pool (file I/O, network and C code): more threads for a remote store.

    Every image at fault is appended to ``faults`` (json order); without ``faults``, they are
    raised as one DatasetError. Images whose ``file_name`` is invalid (``images.name_ok``) are
    skipped, and the size of those whose width/height is invalid is not compared. An image
    root that is missing or not a folder raises DatasetError.
    """
    _check_root(files)
    n = len(images.file_names)
    sizes = np.empty(n, dtype=np.int64)
    threads = LOCAL_THREADS if files.local else REMOTE_THREADS
    chunk = max(1, min(_CHUNK, -(-n // (4 * threads))))  # small datasets: use every thread too
    starts = range(0, n, chunk)
    clients = [files] if files.local else _clients(files, -(-min(threads, len(starts)) // REMOTE_CONNECTIONS))
    found: list[FileFault] = [] if faults is None else faults
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="kfold-ray-check")
    try:
        jobs = pool.map(
            lambda s: _check_chunk(clients[(s // chunk) % len(clients)], images, s, chunk, decode), starts
        )
        for start, (chunk_sizes, chunk_faults) in zip(starts, jobs):
            sizes[start : start + len(chunk_sizes)] = chunk_sizes
            found.extend(f._replace(path=f.path or path) for f in chunk_faults)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    if faults is None and found:
        problems = Problems()
        for f in found:
            problems.add(f"{_at('images', f.index, {'id': int(images.ids[f.index])})}: {f.problem}", f.path)
        problems.raise_if_any()
    return sizes


def _clients(files: ImageFiles, count: int) -> list[ImageFiles]:
    """``files`` and up to ``count - 1`` more views of it, each with a filesystem (and so a
    connection pool) of its own; fewer if a filesystem cannot be opened again."""
    out = [files]
    for _ in range(count - 1):
        try:
            fs = pafs.FileSystem.from_uri(files.location)[0]
        except (OSError, ValueError, pa.ArrowException):
            break
        out.append(ImageFiles(fs, files.root, files.location))
    return out


def _check_root(files: ImageFiles) -> None:
    where = shown(files.location)
    if files.local:
        if not os.path.isdir(files.root):
            what = "does not exist" if not os.path.exists(files.root) else "is not a folder"
            raise DatasetError(f"image root {what}", path=where)
        return
    kind = remote_info(files.fs, files.root, "image root", files.location).type
    if kind == pafs.FileType.NotFound:
        raise DatasetError("image root does not exist", path=where)
    if kind != pafs.FileType.Directory:
        raise DatasetError("image root is not a folder", path=where)


def _check_chunk(files: ImageFiles, images: ImageTable, start: int, chunk: int, decode: bool):
    sizes, faults = [], []
    for i in range(start, min(start + chunk, len(images.file_names))):
        if images.name_ok is not None and not images.name_ok[i]:
            sizes.append(-1)  # its name is a problem already
            continue
        want = None
        if images.size_ok is None or images.size_ok[i]:
            want = (int(images.widths[i]), int(images.heights[i]))
        size, problem, bad_file, unreadable = _check_file(files, images.file_names[i], want, decode)
        if problem is not None:
            faults.append(FileFault(i, problem, bad_file or "", unreadable))
        sizes.append(size)
    return sizes, faults


class _Missing(Exception):
    """The file is not there (``directory``: a folder is)."""

    def __init__(self, directory: bool) -> None:
        self.directory = directory


def _check_file(files: ImageFiles, name: str, want: tuple[int, int] | None, decode: bool):
    """(byte size, problem or None, the image's location when the file itself is at fault,
    whether the file is unreadable). ``want``: the json's (width, height), None: not compared."""
    try:
        with _open(files, name, decode) as (size, read):
            if not decode:
                return size, None, None, False
            try:
                whole = 0 if files.local else REMOTE_WHOLE_BYTES
                got = _image_size(read, size, files.location_of(name), whole_below=whole)
            except Exception as exc:  # noqa: BLE001 - PIL raises many kinds for a bad file
                detail = _one_line(exc)
                return -1, f"corrupt or unreadable image {show(name)}: {detail}", files.location_of(name), True
    except _Missing as m:
        root = shown(files.location)
        if m.directory:
            return -1, f"{show(name)} under image root {root} is not a file", None, True
        hint = " (it uses '\\'; write '/' between folders)" if "\\" in name else ""
        return -1, f"file {show(name)} not found under image root {root}{hint}", None, True
    except (OSError, pa.ArrowException) as exc:
        cause = exc.strerror if isinstance(exc, OSError) and exc.strerror else _one_line(exc)[:300]
        return -1, f"cannot read file {show(name)}: {cause}", files.location_of(name), True
    if want is not None and got[:2] != want:
        turned = " after its EXIF rotation" if got[2] else ""
        msg = (f"'width'/'height' {want[0]}x{want[1]} do not match the file {show(name)}, "
               f"which is {got[0]}x{got[1]}{turned}")  # fmt: skip
        return -1, msg, None, False
    return size, None, None, False


@contextlib.contextmanager
def _open(files: ImageFiles, name: str, decode: bool):
    """Yield (byte size, ``read(nbytes, offset) -> bytes``) of a regular file, or raise
    `_Missing`. Without ``decode`` only the size is looked up (``read`` is None)."""
    full = files.path(name)
    if files.local:
        try:
            st = os.stat(full)
        except FileNotFoundError:
            raise _Missing(directory=False) from None
        if not stat.S_ISREG(st.st_mode):
            raise _Missing(directory=True)
        if not decode:
            yield st.st_size, None
            return
        fd = os.open(full, os.O_RDONLY)
        try:
            yield st.st_size, lambda nbytes, offset: os.pread(fd, nbytes, offset)
        finally:
            os.close(fd)
        return
    if not decode:
        info = files.fs.get_file_info(full)
        if info.type != pafs.FileType.File:
            raise _Missing(directory=info.type == pafs.FileType.Directory)
        yield info.size, None
        return
    try:  # one request for the size (and existence) ...
        f = files.fs.open_input_file(full)
    except (OSError, pa.ArrowException):
        kind = files.fs.get_file_info(full).type  # ... and one more only when it fails
        if kind != pafs.FileType.File:
            raise _Missing(directory=kind == pafs.FileType.Directory) from None
        raise
    with f:
        yield f.size(), f.read_at


class _Named(io.BytesIO):
    """Image bytes that PIL's messages name by the file's location (as when opened by path)."""

    def __init__(self, data: bytes, location: str) -> None:
        super().__init__(data)
        self.location = location

    def __repr__(self) -> str:
        return repr(self.location)


def _image_size(read, nbytes: int, location: str, *, whole_below: int = 0) -> tuple[int, int, bool]:
    """(width, height, turned) as Detectron2 will read the image; raises if the file is bad.

    A JPEG is judged by its header (the bytes up to the start of scan, usually within the first
    `HEAD_BYTES`) and its last `TAIL_BYTES` (end-of-image marker): a ranged read of each. Other
    formats are read whole: PNG ``verify()`` checks every chunk's CRC, and WebP/TIFF may keep
    their EXIF after the pixels. A file of at most ``whole_below`` bytes is read in one go.
    Nothing is decoded.
    """
    data = read(nbytes if nbytes <= whole_below else min(nbytes, HEAD_BYTES), 0)
    if not data.startswith(_JPEG_MAGIC):
        data += _read_more(read, len(data), nbytes - len(data))
    while True:
        whole = len(data) >= nbytes
        try:
            got = _header(data, location, whole)
        except Exception:  # a header cut by our read, or a bad file: only the whole file says
            if whole:
                raise
            got = None
        if got is not None:
            break
        more = _read_more(read, len(data), min(nbytes, max(4 * len(data), _GROW_BYTES)) - len(data))
        if not more:  # the file shrank under us: judge what there is
            nbytes = len(data)
        data += more
    w, h, fmt, turned = got
    if fmt == "JPEG":
        tail = data[-TAIL_BYTES:] if len(data) >= nbytes else read(TAIL_BYTES, nbytes - TAIL_BYTES)
        if b"\xff\xd9" not in tail:
            raise OSError("truncated JPEG (no end-of-image marker)")
    return (h, w, True) if turned else (w, h, False)


def _read_more(read, offset: int, nbytes: int) -> bytes:
    return read(nbytes, offset) if nbytes > 0 else b""


def _header(data: bytes, location: str, whole: bool) -> tuple[int, int, str, bool] | None:
    """(width, height, format, EXIF turns it) from ``data``; None when a JPEG header runs past
    it (``whole``: ``data`` is the entire file, then ``verify()`` runs too)."""
    from PIL import Image  # Pillow is only needed when images are checked

    if data.startswith(_JPEG_MAGIC):
        fast = jpeg_header(data, Image.MAX_IMAGE_PIXELS)
        if fast is _MORE and not whole:
            return None
        if isinstance(fast, tuple):
            return fast[0], fast[1], "JPEG", fast[2] in _SWAPS_SIDES
    with Image.open(_Named(data, location)) as im:
        fmt = im.format
        if not whole and not (fmt == "JPEG" and im.tile):  # start of scan not reached yet
            return None
        w, h = im.size
        # PNG keeps EXIF after the pixels, and getexif() would decode them all: use it only
        # when the header already carried it.
        has_exif = fmt != "PNG" or "exif" in im.info
        turned = has_exif and im.getexif().get(0x0112) in _SWAPS_SIDES
        if whole:
            im.verify()
    return w, h, fmt, turned


# ---- JPEG headers without Pillow's Python parser ------------------------------------------------
# Pillow parses a JPEG's markers in Python (~80 us per file, under the GIL): most of the time of a
# local check. This reads the same markers for the common case and gives up (None: Pillow then
# judges the same bytes) on anything it does not read exactly as Pillow would: XMP, MPO,
# Photoshop blocks, odd bytes between segments, non-8-bit or unusual layer counts, an EXIF
# orientation that is not a plain SHORT, a huge image (Pillow's decompression-bomb check).
_MORE = object()  # the bytes end before the start of scan
_SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_SKIPPED_MARKERS = frozenset({0xC4, 0xCC, 0xDC, 0xDD, 0xDF, 0xFE})  # DHT DAC DNL DRI EXP COM
_APP_NEEDS = {b"JFIF": 7, b"Adobe": 7}  # Pillow reads these bytes of such APP segments


def jpeg_header(data: bytes, max_pixels: int | None = None):
    """(width, height, EXIF orientation or 0) of a JPEG from its bytes up to the start of scan;
    `_MORE` when ``data`` ends before it; None when Pillow should judge the file."""
    n, pos = len(data), 2
    size = exif = None
    while True:
        if pos + 4 > n:
            return _MORE
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        end = pos + 2 + ((data[pos + 2] << 8) | data[pos + 3])
        if end < pos + 4:
            return None
        if end > n:
            return _MORE
        if marker == 0xDA:  # start of scan: the header is complete
            break
        seg = data[pos + 4 : end]
        if marker in _SOF_MARKERS:
            if len(seg) < 6 or (len(seg) - 6) % 3 or seg[0] != 8 or seg[5] not in (1, 3, 4):
                return None  # Pillow reads 3 bytes per component: a ragged end fails there
            size = ((seg[3] << 8) | seg[4], (seg[1] << 8) | seg[2])
        elif marker == 0xDB:
            while seg:  # quantization tables, checked as Pillow does
                qt = 1 + (64 if seg[0] < 16 else 128)
                if len(seg) < qt:
                    return None
                seg = seg[qt:]
        elif 0xE0 <= marker <= 0xEF:
            if marker == 0xE1:
                if not seg.startswith(b"Exif\0\0") or exif is not None:
                    return None  # XMP (may carry an orientation), or a second EXIF block
                exif = seg
            elif marker == 0xE2 and (
                seg.startswith(b"MPF\0") or (seg.startswith(b"ICC_PROFILE\0") and len(seg) < 14)
            ):
                return None  # an MPO file, or an ICC piece Pillow cannot number
            elif marker == 0xED and seg.startswith(b"Photoshop 3.0\0"):
                return None
            else:
                for magic, need in _APP_NEEDS.items():
                    if seg.startswith(magic) and len(seg) < need:
                        return None
        elif marker not in _SKIPPED_MARKERS:
            return None
        pos = end
    if size is None or size[0] <= 0 or size[1] <= 0:
        return None
    if max_pixels is not None and size[0] * size[1] > max_pixels:
        return None
    orientation = _exif_orientation(exif) if exif is not None else 0
    return None if orientation is None else (size[0], size[1], orientation)


#: Byte size of each TIFF field type Pillow reads (``ImageFileDirectory_v2._load_dispatch``).
_TIFF_UNIT = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4, 16: 8}


def _exif_orientation(seg: bytes) -> int | None:
    """Tag 0x0112 of IFD0 of an APP1 EXIF block (0: none); None unless every IFD0 entry is one
    that Pillow reads in full (Pillow drops the tags after a bad one), and the orientation a
    plain SHORT."""
    tiff = seg[6:]
    if tiff[:4] == b"II*\0":
        order = "<"
    elif tiff[:4] == b"MM\0*":
        order = ">"
    else:
        return None
    try:
        (ifd,) = struct.unpack_from(order + "I", tiff, 4)
        (count,) = struct.unpack_from(order + "H", tiff, ifd)
        if ifd + 2 + 12 * count + 4 > len(tiff):
            return None
        found, data_size = 0, 0
        for k in range(count):
            at = ifd + 2 + 12 * k
            tag, kind, num, offset = struct.unpack_from(order + "HHII", tiff, at)
            size = num * _TIFF_UNIT.get(kind, 0)
            if size == 0:
                return None
            if size > 4:
                data_size += size
                if offset + size > len(tiff) or data_size > len(tiff):
                    return None
            if tag == 0x0112:
                if kind != 3 or num != 1 or found:
                    return None
                (found,) = struct.unpack_from(order + "H", tiff, at + 8)
                if not found:
                    return None
        return found
    except struct.error:
        return None


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
