"""Mask R-CNN data: COCO segmentations (polygons, RLE, crowd RLE) reach Detectron2 as masks.

`_register_split`'s dicts go through Detectron2's own DatasetMapper (``MODEL.MASK_ON``) into
``gt_masks`` that cover the boxes they were drawn from; a real (tiny, CPU) Mask R-CNN trains a
step on them with a finite mask loss.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
from cocofactory import make_coco

from kfold_ray._config import TrainConfig
from kfold_ray.data._dataset import load_coco
from kfold_ray.detectron2 import Detectron2Backend
from kfold_ray.detectron2._config import import_detectron2
from kfold_ray.detectron2._data import register_split
from kfold_ray.detectron2._train import train

MASK_OVERRIDES = ("MODEL.MASK_ON", "True", "MODEL.ROI_MASK_HEAD.CONV_DIM", "64",
                  "DATALOADER.NUM_WORKERS", "0", "SOLVER.IMS_PER_BATCH", "2")  # fmt: skip


def _cfg(dataset, mask_format: str, *extra: str, dataset_name: str = "", output_dir: str = ""):
    overrides = (*MASK_OVERRIDES, "INPUT.MASK_FORMAT", mask_format, *extra)
    return Detectron2Backend().build_cfg(
        TrainConfig(model="tiny", overrides=overrides), num_classes=dataset.num_classes,
        device="cpu", dataset_name=dataset_name, output_dir=output_dir,
    )


def _dataset(tmp_path, kind: str):
    # awkward: an image without boxes, a crowd box (an RLE mask, left out of training), mixed sizes
    ann, images = make_coco(tmp_path / kind, n_images=8, awkward=True, segmentation=kind)
    return load_coco(ann, images)


@pytest.mark.parametrize("kind, mask_format", [("polygon", "polygon"), ("polygon", "bitmask"),
                                               ("rle", "bitmask"), ("mixed", "bitmask")])
def test_mapper_makes_gt_masks_that_cover_the_boxes(tmp_path, kind, mask_format):
    import_detectron2()
    from detectron2.data import DatasetCatalog, DatasetMapper
    from detectron2.structures import BitMasks, PolygonMasks

    ds = _dataset(tmp_path, kind)
    assert ds.has_segmentations and ds.segmentation_problem() is None
    assert ds.mask_format == ("polygon" if kind == "polygon" else "bitmask")
    name = register_split(f"masks_{kind}_{mask_format}", ds, np.arange(ds.num_images))
    dicts = DatasetCatalog.get(name)
    assert sum(len(d["annotations"]) for d in dicts) == int((~ds.iscrowd).sum())  # crowd left out
    for d in dicts:
        for a in d["annotations"]:
            segm = a["segmentation"]
            assert isinstance(segm, list) or isinstance(segm["counts"], (bytes, str))  # RLE compressed
    mapper = DatasetMapper(_cfg(ds, mask_format), is_train=True)
    seen = 0
    for d in dicts:
        inst = mapper(copy.deepcopy(d))["instances"]
        if not d["annotations"]:
            continue
        masks = inst.gt_masks
        assert isinstance(masks, PolygonMasks if mask_format == "polygon" else BitMasks)
        assert len(masks) == len(inst.gt_boxes) == len(d["annotations"])
        # each mask is its box (resized with the image): their bounding boxes agree
        np.testing.assert_allclose(masks.get_bounding_boxes().tensor.numpy(),
                                   inst.gt_boxes.tensor.numpy(), atol=2.5)
        if mask_format == "bitmask":
            box_area = inst.gt_boxes.area().numpy()
            np.testing.assert_allclose(masks.tensor.sum(dim=(1, 2)).numpy(), box_area, rtol=0.15)
        seen += 1
    assert seen >= 6


def test_polygon_mask_format_cannot_take_rle(tmp_path):
    """Why the backend must set INPUT.MASK_FORMAT bitmask when a (non-crowd) mask is an RLE."""
    import_detectron2()
    from detectron2.data import DatasetCatalog, DatasetMapper

    ds = _dataset(tmp_path, "rle")
    name = register_split("masks_rle_as_polygons", ds, np.arange(ds.num_images))
    mapper = DatasetMapper(_cfg(ds, "polygon"), is_train=True)
    with pytest.raises(ValueError, match="polygon"):
        for d in DatasetCatalog.get(name):
            mapper(copy.deepcopy(d))


def test_without_masks_the_dicts_carry_none(tmp_path):
    import_detectron2()
    from detectron2.data import DatasetCatalog

    ds = _dataset(tmp_path, "polygon")
    name = register_split("masks_off", ds, np.arange(ds.num_images), masks=False)
    assert all("segmentation" not in a for d in DatasetCatalog.get(name) for a in d["annotations"])


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["polygon", "mixed"])
def test_mask_rcnn_trains_a_step_with_a_mask_loss(tmp_path, kind):
    import_detectron2()
    import torch
    from detectron2.engine import DefaultTrainer
    from detectron2.utils.events import EventStorage

    ds = _dataset(tmp_path, kind)
    name = register_split(f"mask_train_{kind}", ds, np.arange(ds.num_images))
    cfg = _cfg(ds, ds.mask_format, "SOLVER.MAX_ITER", "1", dataset_name=name,
               output_dir=str(tmp_path / "out"))
    torch.manual_seed(0)
    trainer = DefaultTrainer(cfg)
    trainer.resume_or_load(resume=False)
    with EventStorage(0) as trainer.storage:
        trainer.iter = 0
        trainer.run_step()
        losses = {k: v[0] for k, v in trainer.storage.latest().items() if k.startswith("loss_")}
    assert "loss_mask" in losses and all(np.isfinite(v) for v in losses.values()), losses
    assert losses["loss_mask"] > 0


@pytest.mark.slow
def test_the_folds_training_loop_trains_a_mask_rcnn(tmp_path):
    """kfold-ray's own loop (`_train`, as a fold runs it) on a Mask R-CNN config, 2 iterations."""
    ds = _dataset(tmp_path, "mixed")
    name = register_split("mask_fold_loop", ds, np.arange(ds.num_images))
    cfg = _cfg(ds, ds.mask_format, "SOLVER.MAX_ITER", "2", dataset_name=name,
               output_dir=str(tmp_path / "out"))
    loop = train(cfg, fold=0)
    events = []
    try:
        while True:
            events.append(next(loop))
    except StopIteration as done:
        model = done.value
    assert model.roi_heads.mask_on and events[-1].step == events[-1].total == 2
    assert all(e.loss is None or np.isfinite(e.loss) for e in events)


def test_a_mask_rcnn_predicts_boxes_only_and_the_same_boxes(tmp_path, monkeypatch):
    """Held-out prediction keeps boxes, scores and classes: the mask head does not run, no mask is
    pasted or copied, and the boxes are those the full model (masks on) gives."""
    import_detectron2()
    import torch
    from detectron2.modeling import build_model

    import kfold_ray.detectron2._predict as predict_module
    from kfold_ray._backend import FoldTask
    from kfold_ray._config import PredictConfig
    from kfold_ray._schema import batch_image_indices

    ds = _dataset(tmp_path, "polygon")
    cfg = _cfg(ds, "polygon", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0")
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    mask_calls = []
    model.roi_heads.mask_head.register_forward_hook(lambda *a: mask_calls.append(1))
    outputs_seen = []
    to_batch = predict_module._to_record_batch

    def record(fold, indices, outputs, dataset, model_id=""):
        outputs_seen.extend(outputs)
        return to_batch(fold, indices, outputs, dataset, model_id)

    monkeypatch.setattr(predict_module, "_to_record_batch", record)
    task = FoldTask(run_name="t", fold=0, attempt=0, train_indices=np.zeros(0, np.int64),
                    predict_indices=np.arange(ds.num_images), work_dir="", seed=0,
                    predict=PredictConfig(batch_size=4, score_threshold=0.0))
    batches = [e for e in predict_module.predict(model, cfg, task, ds, "cpu") if hasattr(e, "num_rows")]
    assert mask_calls == [] and outputs_seen
    assert not any(out["instances"].has("pred_masks") for out in outputs_seen)
    assert model.roi_heads.mask_on, "the model is left as it was"

    # The same batches through the whole model, masks on: the same boxes.
    loader = predict_module._InputLoader(cfg)
    full = []
    with torch.inference_mode():
        for b in batches:
            full += model([loader(ds, int(i)) for i in batch_image_indices(b)])
    assert mask_calls and full[0]["instances"].has("pred_masks")
    for ours, theirs in zip(outputs_seen, full):
        torch.testing.assert_close(ours["instances"].pred_boxes.tensor,
                                   theirs["instances"].pred_boxes.tensor)
        torch.testing.assert_close(ours["instances"].scores, theirs["instances"].scores)
