"""Stage 1: a COCO detection dataset, loaded and validated before anything is reserved.

`CocoDataset` is plain data (numpy arrays, tuples): it pickles cheaply into the Ray object store
and never depends on Detectron2. Annotations are stored flat and grouped by image (CSR layout):
the annotations of image ``i`` are rows ``ann_offsets[i]:ann_offsets[i + 1]`` of ``boxes``,
``classes``, ``iscrowd`` and ``ann_ids`` (and of ``segmentations``, packed the same way).

Class index = rank of the COCO category id in ascending order (Detectron2's convention for
COCO json), so ``categories[c]`` is the category of class index ``c``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import operator
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import pyarrow.fs as pafs

from .._exceptions import DatasetError, StorageError
from ..storage import _locations
from ..storage._storage import open_location
from .validate import _files, _json, _masks
from .validate._image_table import ImageTable
from .validate._masks import Segmentations


@dataclass(frozen=True)
class Category:
    id: int
    name: str
    supercategory: str | None = None


@dataclass(frozen=True)
class ExcludedImage:
    """An image left out of the dataset because its file cannot be read (``exclude_unreadable``).

    ``reason``: the one-line problem (``file "x.png" not found under image root /data/images``,
    ``corrupt or unreadable image "y.jpg": truncated JPEG (no end-of-image marker)``).
    """

    image_id: int
    file_name: str
    reason: str

    def record(self) -> dict[str, Any]:
        return {"image_id": self.image_id, "file_name": self.file_name, "reason": self.reason}


@dataclass(frozen=True, eq=False)
class CocoDataset:
    """A validated COCO detection dataset. Images keep the order of the json's ``images`` list.

    Attributes:
        annotations_path: the COCO json it was loaded from: an absolute local path or a URI.
        image_root: folder the images' ``file_name`` are relative to: an absolute local path (a
            local disk, or a mount at the same path on every node) or a URI (``s3://bucket/x``,
            ``gs://...``) that each process opens with its own credentials.
        image_ids: int64 (N,) COCO image ids, in file order.
        file_names: N names relative to ``image_root``, as written in the json.
        widths, heights: int64 (N,) image sizes in pixels, as in the json (checked against the files).
        categories: the categories sorted by id; position = class index.
        ann_offsets: int64 (N + 1,) CSR offsets into the annotation arrays.
        ann_ids: int64 (M,) COCO annotation ids.
        boxes: float32 (M, 4) absolute ``[x1, y1, x2, y2]`` (converted from COCO xywh).
        classes: int64 (M,) class index of each annotation.
        iscrowd: bool (M,) crowd annotations: kept out of training and of cleanlab labels.
        image_extras: per image, the json fields other than id/file_name/width/height (for
            group splits by an image field, e.g. ``video_id``).
        fingerprint: sha256 of the annotations file bytes, the image files' names and sizes, and
            the names of the excluded images.
        segmentations: each annotation's ``segmentation`` (polygons or RLE, rows aligned with
            ``boxes``), packed (`Segmentations`); None for a dataset not built by `load_coco`.
        excluded: images left out because their file cannot be read (``exclude_unreadable``),
            in json order; they and their annotations are not in the arrays above.
    """

    annotations_path: str
    image_root: str
    image_ids: np.ndarray
    file_names: tuple[str, ...]
    widths: np.ndarray
    heights: np.ndarray
    categories: tuple[Category, ...]
    ann_offsets: np.ndarray
    ann_ids: np.ndarray
    boxes: np.ndarray
    classes: np.ndarray
    iscrowd: np.ndarray
    image_extras: tuple[Mapping[str, Any], ...] = field(default=())
    fingerprint: str = ""
    segmentations: Segmentations | None = None
    excluded: tuple[ExcludedImage, ...] = ()

    def __post_init__(self) -> None:
        # Plain strings, whatever a caller passed: a URI must not go through pathlib ('s3:/').
        for name in ("annotations_path", "image_root"):
            value = getattr(self, name)
            if isinstance(value, os.PathLike):
                object.__setattr__(self, name, os.fspath(value))

    # ---- sizes and maps -------------------------------------------------------------------
    @property
    def num_images(self) -> int:
        return int(self.image_ids.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.categories)

    @property
    def category_ids(self) -> np.ndarray:
        """int64 (C,): COCO category id of each class index."""
        return np.array([c.id for c in self.categories], dtype=np.int64)

    @property
    def class_names(self) -> list[str]:
        return [c.name for c in self.categories]

    @property
    def class_of_category(self) -> dict[int, int]:
        """COCO category id -> class index."""
        return {c.id: i for i, c in enumerate(self.categories)}

    # ---- image files ------------------------------------------------------------------------
    def image_path(self, index: int) -> str:
        """Image ``index`` as an absolute local path or a URI (``image_root/file_name``)."""
        return _locations.join(self.image_root, self.file_names[index])

    def image_filesystem(self, index: int | None = None) -> tuple[pafs.FileSystem, str]:
        """(pyarrow filesystem, path in it) of image ``index`` (of the image root when None).

        The filesystem is opened once per process and image root (not pickled with the dataset:
        each node opens it with its own credentials).
        """
        fs, root = open_image_root(self.image_root)
        return (fs, root) if index is None else (fs, _locations.join(root, self.file_names[index]))

    def read_image_bytes(self, index: int) -> bytes:
        """The bytes of image ``index`` file (see `read_image_bytes`)."""
        return read_image_bytes(self, index)

    # ---- per-image annotations --------------------------------------------------------------
    def annotations_of(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(boxes float32 (L, 4) xyxy, classes int64 (L,), iscrowd bool (L,)) of image ``index``."""
        lo, hi = int(self.ann_offsets[index]), int(self.ann_offsets[index + 1])
        return self.boxes[lo:hi], self.classes[lo:hi], self.iscrowd[lo:hi]

    def classes_present(self) -> list[np.ndarray]:
        """Per image, the sorted unique class indices of its non-crowd boxes."""
        out = []
        for i in range(self.num_images):
            _, cls, crowd = self.annotations_of(i)
            out.append(np.unique(cls[~crowd]))
        return out

    def cleanlab_labels(self) -> list[dict[str, np.ndarray]]:
        """cleanlab's object-detection labels, one dict per image in dataset order.

        ``{"bboxes": float32 (L, 4) [x1, y1, x2, y2], "labels": int64 (L,)}``, crowd boxes left out.
        """
        keep = ~self.iscrowd
        # Offsets of kept rows: a cumulative count makes the per-image slices without a loop
        # over annotations.
        kept_before = np.concatenate([[0], np.cumsum(keep)])
        starts = kept_before[self.ann_offsets[:-1]]
        ends = kept_before[self.ann_offsets[1:]]
        boxes = np.ascontiguousarray(self.boxes[keep], dtype=np.float32)
        labels = self.classes[keep].astype(np.int64)
        return [
            {"bboxes": boxes[s:e].copy(), "labels": labels[s:e].copy()}
            for s, e in zip(starts.tolist(), ends.tolist())
        ]

    # ---- masks ------------------------------------------------------------------------------
    def segmentation(self, row: int) -> list[list[float]] | dict[str, Any] | None:
        """Annotation row ``row``'s segmentation as COCO writes it: a list of polygons (flat
        ``[x1, y1, x2, y2, ...]`` lists), or an RLE ``{"size": [h, w], "counts": str |
        list[int]}``; None when it has none."""
        return None if self.segmentations is None else self.segmentations.get(row)

    def segmentations_of(self, index: int) -> list[list[list[float]] | dict[str, Any] | None]:
        """The segmentations of image ``index``'s annotations, aligned with `annotations_of`."""
        lo, hi = int(self.ann_offsets[index]), int(self.ann_offsets[index + 1])
        return [self.segmentation(r) for r in range(lo, hi)]

    @property
    def has_segmentations(self) -> bool:
        """Every non-crowd annotation has a segmentation (what ``MODEL.MASK_ON`` needs)."""
        return self.segmentation_problem() is None

    @property
    def mask_format(self) -> str:
        """Detectron2's ``INPUT.MASK_FORMAT`` that can read this dataset's (non-crowd) masks:
        ``"bitmask"`` when one of them is an RLE, else ``"polygon"``."""
        seg = self.segmentations
        if seg is not None and (seg.kind[~self.iscrowd] == _masks.RLE).any():
            return "bitmask"
        return "polygon"

    def segmentation_problem(self) -> str | None:
        """None when every non-crowd annotation has a segmentation; else one line naming the
        first (json order) without one: ``annotations[4] (id 12): no 'segmentation', which
        MODEL.MASK_ON needs (3 of 120 non-crowd annotations have none)``."""
        if self.segmentations is None:
            return ("annotations: the dataset holds no segmentations (it was not loaded with "
                    "load_coco), which MODEL.MASK_ON needs")
        return self.segmentations.missing

    @property
    def mask_problems(self) -> tuple[str, ...]:
        """The segmentations that cannot be used, one line each (``"<file>: annotations[3] (id
        4): 'segmentation' RLE 'counts' cover 120 pixels, not height x width = ..."``); their
        annotations hold no mask. Empty when every segmentation is fine."""
        return () if self.segmentations is None else self.segmentations.problems

    def mask_error(self) -> DatasetError | None:
        """What stops a model that trains masks (``MODEL.MASK_ON``): every unusable
        segmentation (`mask_problems`), else the first non-crowd annotation without one
        (`segmentation_problem`); None when the masks can be trained."""
        seg = self.segmentations
        if seg is not None and seg.problems:
            first = seg.problems[0]
            prefix = f"{self.annotations_path}: "
            return DatasetError(first[len(prefix):] if first.startswith(prefix) else first,
                                path=str(self.annotations_path), problems=list(seg.problems),
                                problem_count=seg.problem_count)
        problem = self.segmentation_problem()
        return None if problem is None else DatasetError(problem, path=str(self.annotations_path))

    def mask_warning(self) -> str | None:
        """One line for a model that trains boxes only, when some segmentations cannot be used
        (they are ignored: the model never reads them); None when all are fine."""
        seg = self.segmentations
        if seg is None or not seg.problems:
            return None
        n = seg.problem_count
        first = seg.problems[0]
        return (f"{n} annotation{'s have a segmentation' if n > 1 else ' has a segmentation'} that "
                f"cannot be used, ignored since the model trains boxes only (an error with "
                f"MODEL.MASK_ON); the first: {first}")

    # ---- excluded images --------------------------------------------------------------------
    def excluded_records(self) -> list[dict[str, Any]]:
        """The excluded images as JSON-able dicts: ``image_id``, ``file_name``, ``reason``."""
        return [e.record() for e in self.excluded]


# ---- image storage ----------------------------------------------------------------------------
# (pid, image root, storage settings) -> (filesystem, root path in it). Per process: a forked
# data-loader worker opens its own (an S3 client is not fork-safe); per settings: a test or a
# notebook that switches endpoint or credentials gets a new filesystem.
_FILESYSTEMS: dict[tuple[Any, ...], tuple[pafs.FileSystem, str]] = {}
_STORAGE_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_REGION", "AWS_DEFAULT_REGION",
                "GOOGLE_APPLICATION_CREDENTIALS", "STORAGE_EMULATOR_HOST")  # fmt: skip


def _cache_key(root: str) -> tuple[Any, ...]:
    return (os.getpid(), root, *map(os.environ.get, _STORAGE_ENV))


def open_image_root(root: str | os.PathLike[str]) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, the folder's path in it) of an image root path or URI, opened once
    per process. Raises StorageError (one line naming the root) for an unknown scheme."""
    root = os.fspath(root)
    key = _cache_key(root)
    got = _FILESYSTEMS.get(key)
    if got is None:
        fs, path, _ = open_location(root, what="image root")
        got = _FILESYSTEMS[key] = (fs, path)
    return got


def read_image_bytes(dataset_or_root: "CocoDataset | str | os.PathLike[str]", image: int | str) -> bytes:
    """The bytes of an image file, read through the image root's filesystem (local or remote).

    ``read_image_bytes(dataset, i)`` reads image ``i`` of a dataset; ``read_image_bytes(root,
    file_name)`` a file under an image root path or URI. Raises what the filesystem raises
    (FileNotFoundError, OSError), or StorageError for a root that cannot be opened.
    """
    if isinstance(dataset_or_root, CocoDataset):
        root = dataset_or_root.image_root
        name = image if isinstance(image, str) else dataset_or_root.file_names[operator.index(image)]
    else:
        if not isinstance(image, str):
            raise TypeError(f"with an image root, give a file name, got {type(image).__name__}")
        root, name = os.fspath(dataset_or_root), image
    fs, root_path = open_image_root(root)
    return _files.ImageFiles(fs, root_path, root).read_bytes(name)


# ---- loading ----------------------------------------------------------------------------------
def load_coco(
    annotations: str | os.PathLike[str],
    image_root: str | os.PathLike[str] | None = None,
    *,
    check_images: bool = True,
    exclude_unreadable: bool = False,
) -> CocoDataset:
    """Load a COCO detection json and check all of it, and its image files, before any work starts.

    Args:
        annotations: the COCO json (``images``, ``annotations``, ``categories``): a local path
            or a URI (``s3://bucket/data/annotations.json``, ``gs://...``, ``file:///...``).
        image_root: folder the images' ``file_name`` are relative to, a local path or a URI;
            default: the json's folder. On a cluster every node must read it: give a URI, or a
            path mounted at the same place on every node.
        check_images: read every image's header: readable, the size the json states (after EXIF
            rotation, as Detectron2 reads it), a JPEG end-of-image marker (a ranged read of the
            file's end), a PNG's chunk CRCs. Pixels are never decoded. Without it, image files
            are only looked up (they must exist; their sizes go into the fingerprint).
        exclude_unreadable: leave out the images whose file is missing, not a file, corrupt or
            cannot be read (those found by the checks above), and their annotations, as if the
            json did not list them; they are recorded in ``CocoDataset.excluded`` (and in the
            fingerprint) and a ``UserWarning`` says how many. Problems of the json itself (a
            size that differs from the file's included) stay errors. Default: such an image is
            an error like any other.

    URIs are opened with ``pyarrow.fs``; credentials and endpoints come from the store's standard
    variables (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...). Boxes may reach up to 1 px
    outside their image; they are clipped to it. Images keep the json's order; those without
    annotations are kept. Soft problems (a category with no annotations, a category name used
    twice) are ``UserWarning``s.

    Segmentations (polygons or RLE) are checked and kept (``CocoDataset.segmentations``); one
    that cannot be used (a bad polygon, an RLE that does not fit its image) is not an error here
    but listed in ``CocoDataset.mask_problems``: only a model that trains masks needs it, and
    the backend decides (`CocoDataset.mask_error`, `CocoDataset.mask_warning`).

    Raises:
        DatasetError: every problem found, in the order structure, categories, images,
            annotations, files (json order within each): ``message``/``path`` name the first,
            ``problems`` holds one line each (the first 50), ``problem_count`` counts them all.
            Problems that make the later checks meaningless (invalid json, a missing or empty
            section, a missing or duplicate id) stop the checks at once.
        StorageError: the json's or the images' storage cannot be used (unknown scheme, no such
            bucket, credentials, endpoint); one line naming the location.
    """
    if not isinstance(annotations, (str, os.PathLike)):
        raise TypeError(f"annotations must be a path, got {type(annotations).__name__}")
    if image_root is not None and not isinstance(image_root, (str, os.PathLike)):
        raise TypeError(f"image_root must be a path or None, got {type(image_root).__name__}")
    if not isinstance(check_images, bool):
        raise TypeError(f"check_images must be True or False, got {check_images!r}")
    if not isinstance(exclude_unreadable, bool):
        raise TypeError(f"exclude_unreadable must be True or False, got {exclude_unreadable!r}")
    ann_fs, ann_path, ann_location = open_location(_location(annotations, "annotations"),
                                                   what="annotations")
    if image_root is None:
        root_location = _locations.parent(ann_location)
        root_fs, root_path = ann_fs, _locations.parent(ann_path)
    else:
        root_fs, root_path, root_location = open_location(_location(image_root, "image root"),
                                                          what="image root")
    _FILESYSTEMS[_cache_key(root_location)] = (root_fs, root_path)
    files = _files.ImageFiles(root_fs, root_path, root_location)
    return _load_coco((ann_fs, ann_path, ann_location), files, check_images, exclude_unreadable)


_SHORTENED_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):/(?!/)")


def _location(value: str | os.PathLike[str], what: str) -> str:
    """The path or URI as a str; a URI that pathlib shortened (``s3:/b``) is refused."""
    text = os.fspath(value)
    if not isinstance(value, str) and (m := _SHORTENED_URI.match(str(text))):
        raise StorageError(
            f"{what} {text!r}: a URI given as a pathlib.Path lost a '/' ({m.group(1)}:/ for "
            f"{m.group(1)}://); pass URIs as str"
        )
    return text


def _load_coco(annotations: tuple[pafs.FileSystem, str, str], files: _files.ImageFiles,
               check_images: bool, exclude_unreadable: bool = False) -> CocoDataset:
    where = _json.shown(annotations[2])
    raw, doc = _json.read_document(*annotations)
    cat_items, image_items, ann_items = _json.sections(doc, where)
    problems = _json.Problems()
    cats = _json.parse_categories(cat_items, where, problems)
    category_ids = np.array([c[0] for c in cats], dtype=np.int64)
    images = _json.parse_images(image_items, where, problems)
    anns = _json.parse_annotations(ann_items, images, category_ids, where, problems)
    faults: list[_files.FileFault] = []
    try:
        sizes = _files.check_image_files(files, images, decode=check_images, path=where, faults=faults)
    except DatasetError as e:  # the image root itself: no file can be checked
        problems.add(e.message, e.path or where)
        sizes = np.full(len(images.ids), -1, dtype=np.int64)
    excluded: list[ExcludedImage] = []
    for f in faults:
        if exclude_unreadable and f.unreadable:
            excluded.append(ExcludedImage(int(images.ids[f.index]), images.file_names[f.index], f.problem))
        else:
            at = _json._at("images", f.index, {"id": int(images.ids[f.index])})
            problems.add(f"{at}: {f.problem}", f.path)
    problems.raise_if_any()
    assert anns is not None  # no problems: the table was built
    all_names = images.file_names
    keep = np.ones(len(images.ids), dtype=bool)
    if excluded:
        keep[[f.index for f in faults if f.unreadable]] = False
        images, anns = _without_images(images, anns, keep, excluded, where)
        _warn_excluded(excluded, faults, where)
    for message in _json.soft_problems(cats, anns):
        warnings.warn(f"{where}: {message}", UserWarning, stacklevel=3)
    segmentations = anns.segmentations
    if segmentations is not None:
        segmentations = dataclasses.replace(segmentations, missing=_first_without_mask(anns))
    return CocoDataset(
        annotations_path=annotations[2],
        image_root=files.location,
        image_ids=images.ids,
        file_names=images.file_names,
        widths=images.widths,
        heights=images.heights,
        categories=tuple(Category(i, name, sup) for i, name, sup in cats),
        ann_offsets=anns.offsets,
        ann_ids=anns.ids,
        boxes=anns.boxes,
        classes=anns.classes,
        iscrowd=anns.iscrowd,
        image_extras=images.extras,
        fingerprint=_fingerprint(raw, all_names, sizes, keep),
        segmentations=segmentations,
        excluded=tuple(excluded),
    )


def _without_images(images: ImageTable, anns: _json.AnnotationTable,
                    keep: np.ndarray, excluded: list[ExcludedImage], where: str):
    """The images where ``keep`` is set, and their annotations; DatasetError when nothing to
    train on is left."""
    if not keep.any():
        raise DatasetError(f"all {len(keep)} images were excluded as unreadable (exclude_unreadable), "
                           f"the first as {excluded[0].reason}", path=where)
    images, anns = images.take(keep), anns.take_images(keep)
    n_excluded = len(excluded)
    if anns.iscrowd.all():
        left = ("none of the annotations is left" if not len(anns.iscrowd)
                else f"the {len(anns.iscrowd)} annotations left are all crowd ('iscrowd': 1)")
        raise DatasetError(f"after excluding {n_excluded} unreadable image{'s' if n_excluded > 1 else ''}, "
                           f"{left}: nothing to train on", path=where)
    return images, anns


def _warn_excluded(excluded: list[ExcludedImage], faults: list[_files.FileFault], where: str) -> None:
    at = [f.index for f in faults if f.unreadable]
    listed = "; ".join(f"images[{i}] (id {e.image_id}): {e.reason}" for i, e in zip(at[:3], excluded))
    more = f"; and {len(excluded) - 3} more" if len(excluded) > 3 else ""
    n = len(excluded)
    warnings.warn(
        f"{where}: excluded {n} image{'s' if n > 1 else ''} whose file cannot be read, and "
        f"{'their' if n > 1 else 'its'} annotations (exclude_unreadable; listed in "
        f"CocoDataset.excluded): {listed}{more}", UserWarning, stacklevel=4,
    )


def _first_without_mask(anns: _json.AnnotationTable) -> str | None:
    """One line naming the first (json order) non-crowd annotation without a segmentation."""
    seg = anns.segmentations
    assert seg is not None and anns.json_index is not None
    lacking = np.flatnonzero((seg.kind == _masks.NO_MASK) & ~anns.iscrowd)
    if not lacking.size:
        return None
    row = int(lacking[np.argmin(anns.json_index[lacking])])
    empty = anns.empty_segmentation is not None and bool(anns.empty_segmentation[row])
    what = "'segmentation' is empty" if empty else "no 'segmentation'"
    total = int((~anns.iscrowd).sum())
    return (f"annotations[{int(anns.json_index[row])}] (id {int(anns.ids[row])}): {what}, which "
            f"MODEL.MASK_ON needs ({lacking.size} of {total} non-crowd annotations have none)")


def _fingerprint(raw_json: bytes, file_names: tuple[str, ...], sizes: np.ndarray,
                 kept: np.ndarray | None = None) -> str:
    """sha256 hex of the json bytes and each image's name and byte size (not its location); an
    image excluded as unreadable counts by its name and the mark ``excluded``."""
    h = hashlib.sha256(raw_json)
    kept_list = [True] * len(file_names) if kept is None else kept.tolist()
    for name, size, k in zip(file_names, sizes.tolist(), kept_list):
        h.update(f"\0{name}\0{size if k else 'excluded'}".encode("utf-8", "surrogatepass"))
    return h.hexdigest()
