"""COCO box AP of the out-of-fold predictions: per fold and pooled over the whole dataset.

pycocotools' ``COCOeval`` does the work. The ground truth ``COCO`` object is built in memory from the
`CocoDataset` (the json is not read again). The per-image evaluation (``evaluate()``, the expensive
part) runs once over every image; each fold's numbers come from ``accumulate()`` over that fold's
images only, which gives exactly what ``COCOeval`` with ``params.imgIds`` set to the fold's images
gives (a test checks it). pycocotools is slow at scale (pure Python per image and category: about
80 images/s with 100 detections each on one core here); where ``faster_coco_eval`` is installed
it is used instead (C++, 5x faster here, the same numbers).

Values are pycocotools' fractions in [0, 1]. Where pycocotools has nothing to measure it reports -1.0
(no ground-truth box in the fold, or none in an area range); a fold with ground-truth boxes but no
detection gets 0.0. Ground-truth ``area`` is the box area (the dataset keeps boxes, not masks), so
APs/APm/APl can differ slightly from an evaluation against the original json's mask areas.

Note that pooled AP mixes the scores of K different models; it is the number that matters for
cleanlab (which scores all images together), while the per-fold numbers show whether one fold's
model is off.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import io
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

if TYPE_CHECKING:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from ..data._dataset import CocoDataset

__all__ = ["coco_metrics"]

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def coco_metrics(
    dataset: CocoDataset,
    table: pa.Table,
    fold_of_image: np.ndarray,
    k: int,
    *,
    evaluator: str = "auto",
) -> dict[str, Any]:
    """Per-fold and pooled COCO box AP of stitched out-of-fold predictions.

    Args:
        dataset: the ground truth.
        table: stitched detections (DETECTION_SCHEMA; absolute xyxy boxes, COCO category ids).
        fold_of_image: int (N,) the fold that held out (and predicted) each image.
        k: number of folds.
        evaluator: "pycocotools", "faster_coco_eval", or "auto" (the latter where installed).

    Returns:
        JSON-ready ``{"iou_type": "bbox", "pooled": S, "folds": {"0": S, ..., str(k - 1): S}}``
        where ``S = {"AP", "AP50", "AP75", "APs", "APm", "APl": float, "num_images": int,
        "num_detections": int}``.
    """
    fold_of_image = np.asarray(fold_of_image)
    if fold_of_image.shape != (dataset.num_images,):
        raise ValueError(
            f"fold_of_image has shape {fold_of_image.shape}, expected ({dataset.num_images},)"
        )
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if evaluator not in ("auto", "pycocotools", "faster_coco_eval"):
        raise ValueError(f"evaluator must be auto, pycocotools or faster_coco_eval, not {evaluator!r}")
    if evaluator == "auto":
        evaluator = "faster_coco_eval" if importlib.util.find_spec("faster_coco_eval") else "pycocotools"
    det_image = table.column("image_index").to_numpy()
    subsets = {str(f): dataset.image_ids[fold_of_image == f] for f in range(k)}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        if evaluator == "pycocotools":
            gt = _ground_truth(dataset)
            ev = _evaluate(gt, _results(gt, table))
            pooled = _summary(ev, dataset.image_ids)
            folds = {f: _summary(ev, ids) for f, ids in subsets.items()}
        else:
            pooled, folds = _faster_stats(dataset, table, subsets)
    pooled.update(num_images=dataset.num_images, num_detections=table.num_rows)
    det_fold = fold_of_image[det_image]
    for f, stats in folds.items():
        stats.update(
            num_images=int((fold_of_image == int(f)).sum()),
            num_detections=int((det_fold == int(f)).sum()),
        )
    return {"iou_type": "bbox", "pooled": pooled, "folds": folds}


def _ground_truth(dataset: CocoDataset, coco_class: type | None = None) -> COCO:
    if coco_class is None:
        from pycocotools.coco import COCO as coco_class

    x1, y1, x2, y2 = (dataset.boxes[:, j].astype(np.float64) for j in range(4))
    w, h = x2 - x1, y2 - y1
    counts = np.diff(dataset.ann_offsets)
    ann_image = np.repeat(dataset.image_ids, counts).tolist()
    ann_cat = dataset.category_ids[dataset.classes].tolist()
    crowd = dataset.iscrowd.astype(int).tolist()
    boxes = np.stack([x1, y1, w, h], axis=1).tolist()
    area = (w * h).tolist()
    coco = coco_class()
    sizes = zip(dataset.image_ids.tolist(), dataset.widths.tolist(), dataset.heights.tolist())
    coco.dataset = {
        "images": [{"id": i, "width": wd, "height": ht} for i, wd, ht in sizes],
        "annotations": [
            {"id": j + 1, "image_id": im, "category_id": c, "bbox": b, "area": a, "iscrowd": cr}
            for j, (im, c, b, a, cr) in enumerate(zip(ann_image, ann_cat, boxes, area, crowd))
        ],
        "categories": [{"id": int(c.id), "name": c.name} for c in dataset.categories],
    }
    coco.createIndex()
    return coco


def _results(gt: COCO, table: pa.Table) -> COCO:
    if table.num_rows == 0:  # loadRes cannot take an empty list
        res = type(gt)()
        res.dataset = {
            "images": list(gt.dataset["images"]),
            "categories": copy.deepcopy(gt.dataset["categories"]),
            "annotations": [],
        }
        res.createIndex()
        return res
    col = {n: table.column(n).to_numpy().astype(np.float64) for n in
           ("image_id", "x1", "y1", "x2", "y2", "score", "category_id")}
    rows = np.stack(
        [col["image_id"], col["x1"], col["y1"], col["x2"] - col["x1"], col["y2"] - col["y1"],
         col["score"], col["category_id"]],
        axis=1,
    )
    return gt.loadRes(rows)  # (R, 7) [image_id, x, y, w, h, score, category_id]


def _evaluate(gt: COCO, dt: COCO) -> COCOeval:
    from pycocotools.cocoeval import COCOeval

    evaluator = COCOeval(gt, dt, iouType="bbox")
    evaluator.params.imgIds = sorted(gt.getImgIds())
    evaluator.evaluate()
    return evaluator


def _summary(evaluator: COCOeval, image_ids: np.ndarray) -> dict[str, Any]:
    """accumulate() + summarize() over ``image_ids`` only, reusing the per-image evaluation."""
    all_ids = np.asarray(evaluator._paramsEval.imgIds)
    ids = np.unique(np.asarray(image_ids))
    if ids.size == 0:
        return {name: -1.0 for name in STAT_NAMES}
    pos = np.searchsorted(all_ids, ids)
    # evalImgs is laid out [category][area range][image] over _paramsEval's lists.
    n_cat = len(evaluator._paramsEval.catIds) if evaluator._paramsEval.useCats else 1
    n_area = len(evaluator._paramsEval.areaRng)
    grid = np.empty(len(evaluator.evalImgs), dtype=object)
    grid[:] = evaluator.evalImgs
    grid = grid.reshape(n_cat, n_area, all_ids.size)

    sub = copy.copy(evaluator)
    sub.params = copy.deepcopy(evaluator.params)
    sub._paramsEval = copy.deepcopy(evaluator._paramsEval)
    sub.params.imgIds = sub._paramsEval.imgIds = ids.tolist()
    sub.evalImgs = grid[:, :, pos].ravel().tolist()
    sub.eval, sub.stats = {}, []
    sub.accumulate()
    sub.summarize()
    return {name: float(v) for name, v in zip(STAT_NAMES, sub.stats[: len(STAT_NAMES)])}


def _faster_stats(
    dataset: CocoDataset, table: pa.Table, subsets: dict[str, np.ndarray]
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Pooled and per-subset stats with faster_coco_eval (one C++ evaluation per subset)."""
    from faster_coco_eval import COCO as FasterCOCO
    from faster_coco_eval import COCOeval_faster

    gt = _ground_truth(dataset, FasterCOCO)
    dt = _results(gt, table)

    def stats(image_ids: np.ndarray) -> dict[str, Any]:
        if image_ids.size == 0:
            return {name: -1.0 for name in STAT_NAMES}
        ev = COCOeval_faster(gt, dt, "bbox", print_function=lambda *_: None)
        ev.params.imgIds = np.unique(image_ids).tolist()
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
        return {name: float(v) for name, v in zip(STAT_NAMES, ev.stats[: len(STAT_NAMES)])}

    return stats(dataset.image_ids), {f: stats(ids) for f, ids in subsets.items()}
