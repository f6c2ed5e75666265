"""Checks on each annotation's ``segmentation`` (polygons or RLE), and their packed storage.

A bad mask is a problem of its annotation (collected with the other annotation problems, see
`_validate`); the good ones are packed in a few arrays (`Segmentations`) that pickle cheaply
into Ray's object store, with no Python object per polygon.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain
from typing import TYPE_CHECKING, Any

import numpy as np

from ._problems import _MISSING, _kind, _Records, show

if TYPE_CHECKING:
    from ._image_table import ImageTable


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
        problems: the segmentations that cannot be used (a bad polygon, an RLE whose size or
            counts do not fit its image), one line each (``"<file>: annotations[3] (id 4):
            ..."``, the first `MAX_PROBLEMS`); their rows hold no mask. They are errors only
            for a model that trains masks (the backend decides: ``MODEL.MASK_ON``), else a
            warning: a box detector never reads them.
        problem_count: how many there are in all.
    """

    kind: np.ndarray
    polygon_offsets: np.ndarray
    coord_offsets: np.ndarray
    coords: np.ndarray
    rle_index: np.ndarray
    rle_sizes: np.ndarray
    rle_counts: tuple[Any, ...]
    missing: str | None = None
    problems: tuple[str, ...] = ()
    problem_count: int = 0

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
            self.problems, self.problem_count,
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
    mask of the null or ``[]`` ones (for messages). A bad one is a problem in ``found`` (the
    caller keeps them apart from the other problems: `Segmentations.problems`) and its row
    holds no mask."""
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
