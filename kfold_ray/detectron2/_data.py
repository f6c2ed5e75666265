"""A fold's training data for Detectron2: its split registered in the worker's catalogs, and a
check that this node can read the images at all (another disk, no mount) before training."""

from __future__ import annotations

from typing import Any

import numpy as np

from .._backend import FoldTask
from .._exceptions import ImageReadError, one_line
from .._node import node_name
from ..data._dataset import CocoDataset


def register_split(name: str, dataset: CocoDataset, indices: np.ndarray, *, masks: bool = True) -> str:
    """Register a fold's training images with Detectron2 (inside the actor: see DESIGN.md).

    Every fold keeps the full category list, so class indices never shift between folds. Each
    annotation with a segmentation carries it (``masks``: True) in Detectron2's form: a list of
    polygons, or an RLE dict with compressed counts (an uncompressed RLE is compressed here,
    as Detectron2's own COCO loader does). Detectron2's mapper drops them unless
    ``MODEL.MASK_ON``; an RLE needs ``INPUT.MASK_FORMAT bitmask`` (`CocoDataset.mask_format`).
    """
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.structures import BoxMode

    with_masks = masks and dataset.segmentations is not None

    def segmentation(row: int):
        segm = dataset.segmentation(row)
        if isinstance(segm, dict) and isinstance(segm["counts"], list):
            from pycocotools import mask as mask_util

            h, w = segm["size"]
            segm = mask_util.frPyObjects(segm, h, w)
        return segm

    def dataset_dicts() -> list[dict[str, Any]]:
        dicts = []
        for i in np.asarray(indices).tolist():
            boxes, classes, crowd = dataset.annotations_of(i)
            keep = ~crowd  # crowd boxes are kept out of training
            annotations = [
                {"bbox": b.tolist(), "bbox_mode": BoxMode.XYXY_ABS, "category_id": int(c)}
                for b, c in zip(boxes[keep], classes[keep])
            ]
            if with_masks:
                rows = int(dataset.ann_offsets[i]) + np.flatnonzero(keep)
                for ann, row in zip(annotations, rows.tolist()):
                    segm = segmentation(row)
                    if segm is not None:
                        ann["segmentation"] = segm
            dicts.append({
                "file_name": str(dataset.image_path(i)),
                "image_id": int(dataset.image_ids[i]),
                "height": int(dataset.heights[i]),
                "width": int(dataset.widths[i]),
                "annotations": annotations,
            })
        return dicts

    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
    DatasetCatalog.register(name, dataset_dicts)
    MetadataCatalog.get(name).set(thing_classes=dataset.class_names)
    return name


def check_images_readable(dataset: CocoDataset, task: FoldTask) -> None:
    """Fail fast, with the fix, when this node cannot see the images (another disk, no mount)."""
    from detectron2.utils.file_io import PathManager

    probes = [int(i) for i in (task.train_indices[:1].tolist() + task.predict_indices[:1].tolist())]
    for i in probes:
        path = str(dataset.image_path(i))
        try:
            ok = PathManager.isfile(path)
        except Exception as e:  # noqa: BLE001 - storage errors: the same advice
            raise ImageReadError(node_name(), path, f"{type(e).__name__}: {one_line(e)[:200]}") from None
        if not ok:
            raise ImageReadError(node_name(), path, "no such file on this node")


def image_error(e: FileNotFoundError) -> ImageReadError:
    return ImageReadError(node_name(), str(e.filename or e), "no such file on this node")
