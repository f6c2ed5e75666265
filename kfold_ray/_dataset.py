"""Stage 1: a COCO detection dataset, loaded and validated before anything is reserved.

`CocoDataset` is plain data (numpy arrays, tuples): it pickles cheaply into the Ray object store
and never depends on Detectron2. Annotations are stored flat and grouped by image (CSR layout):
the annotations of image ``i`` are rows ``ann_offsets[i]:ann_offsets[i + 1]`` of ``boxes``,
``classes``, ``iscrowd`` and ``ann_ids``.

Class index = rank of the COCO category id in ascending order (Detectron2's convention for
COCO json), so ``categories[c]`` is the category of class index ``c``.
"""

from __future__ import annotations

import hashlib
import operator
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import pyarrow.fs as pafs

from . import _validate
from ._exceptions import StorageError
from ._storage import open_location


@dataclass(frozen=True)
class Category:
    id: int
    name: str
    supercategory: str | None = None


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
        fingerprint: sha256 of the annotations file bytes and the image files' names and sizes.
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
        return _validate.join(self.image_root, self.file_names[index])

    def image_filesystem(self, index: int | None = None) -> tuple[pafs.FileSystem, str]:
        """(pyarrow filesystem, path in it) of image ``index`` (of the image root when None).

        The filesystem is opened once per process and image root (not pickled with the dataset:
        each node opens it with its own credentials).
        """
        fs, root = open_image_root(self.image_root)
        return (fs, root) if index is None else (fs, _validate.join(root, self.file_names[index]))

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
    return _validate.ImageFiles(fs, root_path, root).read_bytes(name)


# ---- loading ----------------------------------------------------------------------------------
def load_coco(
    annotations: str | os.PathLike[str],
    image_root: str | os.PathLike[str] | None = None,
    *,
    check_images: bool = True,
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

    URIs are opened with ``pyarrow.fs``; credentials and endpoints come from the store's standard
    variables (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...). Boxes may reach up to 1 px
    outside their image; they are clipped to it. Images keep the json's order; those without
    annotations are kept. Soft problems (a category with no annotations, a category name used
    twice) are ``UserWarning``s.

    Raises:
        DatasetError: the first problem found, in the order structure, categories, images,
            annotations, files; a one-line message naming the field and the record's index and id.
        StorageError: the json's or the images' storage cannot be used (unknown scheme, no such
            bucket, credentials, endpoint); one line naming the location.
    """
    if not isinstance(annotations, (str, os.PathLike)):
        raise TypeError(f"annotations must be a path, got {type(annotations).__name__}")
    if image_root is not None and not isinstance(image_root, (str, os.PathLike)):
        raise TypeError(f"image_root must be a path or None, got {type(image_root).__name__}")
    if not isinstance(check_images, bool):
        raise TypeError(f"check_images must be True or False, got {check_images!r}")
    ann_fs, ann_path, ann_location = open_location(_location(annotations, "annotations"),
                                                   what="annotations")
    if image_root is None:
        root_location = _validate.parent(ann_location)
        root_fs, root_path = ann_fs, _validate.parent(ann_path)
    else:
        root_fs, root_path, root_location = open_location(_location(image_root, "image root"),
                                                          what="image root")
    _FILESYSTEMS[_cache_key(root_location)] = (root_fs, root_path)
    files = _validate.ImageFiles(root_fs, root_path, root_location)
    return _load_coco((ann_fs, ann_path, ann_location), files, check_images)


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


def _load_coco(annotations: tuple[pafs.FileSystem, str, str], files: _validate.ImageFiles,
               check_images: bool) -> CocoDataset:
    where = _validate.shown(annotations[2])
    raw, doc = _validate.read_document(*annotations)
    cat_items, image_items, ann_items = _validate.sections(doc, where)
    cats = _validate.parse_categories(cat_items, where)
    category_ids = np.array([c[0] for c in cats], dtype=np.int64)
    images = _validate.parse_images(image_items, where)
    anns = _validate.parse_annotations(ann_items, images, category_ids, where)
    sizes = _validate.check_image_files(files, images, decode=check_images, path=where)
    for message in _validate.soft_problems(cats, anns):
        warnings.warn(f"{where}: {message}", UserWarning, stacklevel=3)
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
        fingerprint=_fingerprint(raw, images.file_names, sizes),
    )


def _fingerprint(raw_json: bytes, file_names: tuple[str, ...], sizes: np.ndarray) -> str:
    """sha256 hex of the json bytes and each image's name and byte size (not its location)."""
    h = hashlib.sha256(raw_json)
    for name, size in zip(file_names, sizes.tolist()):
        h.update(f"\0{name}\0{size}".encode("utf-8", "surrogatepass"))
    return h.hexdigest()
