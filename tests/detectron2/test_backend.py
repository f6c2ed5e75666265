"""The Detectron2 backend's own behaviour, with a real (tiny) model on CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cocofactory import make_coco

from kfold_ray._backend import FoldTask, Progress
from kfold_ray._config import PredictConfig, TrainConfig
from kfold_ray.data._dataset import load_coco
from kfold_ray.detectron2 import Detectron2Backend
from kfold_ray.detectron2._predict import by_size, predict_halving_on_oom
from kfold_ray._exceptions import FoldOutOfMemoryError
from kfold_ray._schema import batch_image_indices


class _OutOfMemoryAbove(torch.nn.Module):
    """The real model, but a batch larger than ``limit`` images 'runs out of GPU memory'."""

    def __init__(self, model, limit: int) -> None:
        super().__init__()
        self.model, self.limit, self.calls = model, limit, []

    def forward(self, inputs):
        self.calls.append(len(inputs))
        if len(inputs) > self.limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.model(inputs)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from detectron2.modeling import build_model

    ann, images = make_coco(tmp_path_factory.mktemp("d") / "data", n_images=11, categories=2,
                            size=[(64, 64), (80, 64), (64, 64), (64, 80)] * 2 + [(64, 64)] * 3)
    dataset = load_coco(ann, images)
    cfg = Detectron2Backend().build_cfg(TrainConfig(model="tiny"), num_classes=2, device="cpu")
    return dataset, cfg, build_model(cfg)


def _task(dataset, batch_size: int) -> FoldTask:
    return FoldTask(run_name="t", fold=0, attempt=0, train_indices=np.zeros(0, np.int64),
                    predict_indices=np.arange(dataset.num_images), work_dir="", seed=0,
                    predict=PredictConfig(batch_size=batch_size))


def test_inference_out_of_memory_goes_on_at_half_the_batch(tiny):
    dataset, cfg, model = tiny
    oom = _OutOfMemoryAbove(model, limit=2)
    events = list(predict_halving_on_oom(oom, cfg, _task(dataset, 8), dataset, "cpu"))
    covered = np.concatenate([batch_image_indices(e) for e in events if not isinstance(e, Progress)])
    assert sorted(covered.tolist()) == list(range(dataset.num_images)), "every image exactly once"
    assert oom.calls[:3] == [8, 4, 2] and set(oom.calls[3:]) <= {1, 2}
    last = [e for e in events if isinstance(e, Progress)][-1]
    assert (last.step, last.total) == (dataset.num_images, dataset.num_images)


def test_inference_out_of_memory_at_batch_one_fails_with_advice(tiny):
    dataset, cfg, model = tiny
    with pytest.raises(FoldOutOfMemoryError, match=r"batch size 1\): even one image at a time does not fit"):
        list(predict_halving_on_oom(_OutOfMemoryAbove(model, limit=0), cfg, _task(dataset, 4),
                                     dataset, "cpu"))


def test_held_out_images_are_batchedby_size(tiny):
    dataset, _, _ = tiny
    order = by_size(dataset, np.arange(dataset.num_images))
    sizes = list(zip(dataset.heights[order].tolist(), dataset.widths[order].tolist()))
    assert sizes == sorted(sizes) and sorted(order.tolist()) == list(range(dataset.num_images))


def test_mask_rcnn_on_boxes_only_is_refused_before_any_fold(tiny):
    from kfold_ray import DatasetError

    dataset, _, _ = tiny
    with pytest.raises(DatasetError, match=r"which MODEL.MASK_ON needs"):
        Detectron2Backend().validate(TrainConfig(model="tiny", overrides=("MODEL.MASK_ON", "True")),
                                     dataset)


def test_a_bad_crowd_rle_stops_mask_training_only(tmp_path):
    """A crowd RLE that does not cover its image (height x width) is loaded; Mask R-CNN refuses
    it in one line naming the annotation, a box detector warns once and goes on."""
    import json
    import warnings

    from kfold_ray import DatasetError

    ann, images = make_coco(tmp_path / "data", n_images=4, segmentation="polygon")
    doc = json.loads(ann.read_text())
    doc["annotations"][1].update(iscrowd=1, segmentation={"size": [80, 96], "counts": [100, 20]})
    ann.write_text(json.dumps(doc))
    dataset = load_coco(ann, images)  # no error: only masks need it
    bad_id = doc["annotations"][1]["id"]
    with pytest.raises(DatasetError, match=rf"^{ann}: annotations\[1\] \(id {bad_id}\): "
                                           r"'segmentation' RLE 'counts' cover 120 pixels"):
        Detectron2Backend().validate(TrainConfig(model="tiny", overrides=("MODEL.MASK_ON", "True")),
                                     dataset)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        Detectron2Backend().validate(TrainConfig(model="tiny"), dataset)
    lines = [str(w.message) for w in seen if issubclass(w.category, UserWarning)
             and "segmentation" in str(w.message)]
    assert len(lines) == 1 and lines[0].startswith(
        "1 annotation has a segmentation that cannot be used, ignored since the model trains boxes only")
def test_held_out_input_pool_gives_the_same_batches_in_the_same_order(tiny):
    from kfold_ray.detectron2._predict import input_threads, prefetch

    dataset, cfg, _ = tiny
    ordered = by_size(dataset, np.arange(dataset.num_images))
    batches = [ordered[i:i + 3] for i in range(0, len(ordered), 3)]

    def run(threads):
        return [(b.tolist(), [(x["image"].clone(), x["height"], x["width"]) for x in inputs])
                for b, inputs in prefetch(batches, dataset, cfg, threads=threads)]

    one, many, again = run(1), run(5), run(5)
    assert [b for b, _ in many] == [b.tolist() for b in batches]  # the order given, whole
    for runs in zip(one, many, again):
        assert len({tuple(b) for b, _ in runs}) == 1
        for images in zip(*(inputs for _, inputs in runs)):
            assert all(torch.equal(images[0][0], x[0]) and images[0][1:] == x[1:] for x in images)
    assert input_threads(1) == 4 and input_threads(0.5) == 4 and input_threads(12) == 48
    assert input_threads(0) == 2 and input_threads(100) == 64


def test_an_unreadable_held_out_image_stops_the_batches_in_order(tiny, tmp_path):
    import shutil

    from kfold_ray.detectron2._predict import prefetch

    dataset, cfg, _ = tiny
    ordered = by_size(dataset, np.arange(dataset.num_images))
    batches = [ordered[i:i + 2] for i in range(0, len(ordered), 2)]
    moved = tmp_path / "images"
    shutil.copytree(dataset.image_root, moved)
    broken = load_coco(dataset.annotations_path, moved)
    (moved / broken.file_names[int(batches[2][1])]).unlink()
    got = []
    with pytest.raises(FileNotFoundError):
        for b, _ in prefetch(batches, broken, cfg, threads=4):
            got.append(b.tolist())
    assert got == [b.tolist() for b in batches[:2]]  # every batch before the missing image
