"""End to end with the real Detectron2 backend on CPU (tiny model, 64-112 px images, few steps).

The dataset has every awkward-but-valid feature: non-contiguous category ids, image order unlike
id order, an image without boxes, a crowd box, mixed sizes, a non-ASCII file name in a subfolder.
The outputs must be read, unmodified, by cleanlab and pycocotools.
"""

from __future__ import annotations

import contextlib
import io
import json
import pickle

import numpy as np
import pyarrow.parquet as pq
import pytest
from cocofactory import make_coco

from kfold_ray import run_cv
from kfold_ray.data._dataset import load_coco

pytestmark = pytest.mark.slow

TINY = ["SOLVER.MAX_ITER", "4", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "2"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    import ray

    root = tmp_path_factory.mktemp("e2e")
    ann, images = make_coco(root / "data", n_images=9, awkward=True, categories=4)
    # No ray.init here: run_cv starts its own local cluster, finds no GPU on it, and trains on
    # CPU although gpus_per_fold is 1 (what a user on a laptop gets).
    try:
        result = run_cv(ann, 3, image_root=images, model="tiny", overrides=TINY, gpus_per_fold=1.0,
                        run_dir=root / "run", score_threshold=0.0, batch_size=2, progress=False)
    finally:
        ray.shutdown()
    return result, load_coco(ann, images)


def test_every_output_exists(finished_run):
    result, _ = finished_run
    for name in ("predictions.parquet", "cleanlab_predictions.pkl", "cleanlab_labels.pkl",
                 "coco_results.json", "folds.json", "categories.json", "metrics.json",
                 "config.json"):
        assert (result.run_dir / name).is_file(), name
    assert not list(result.run_dir.glob("*.tmp")) and not list(result.run_dir.glob(".*.tmp"))


def test_each_fold_records_what_it_trained_with(finished_run):
    """gpus_per_fold=1 on a local cluster without GPUs: the plan says the folds train on CPU
    (one line), and each fold records it beside its checkpoints (a resume checks it)."""
    result, _ = finished_run
    for fold in range(3):
        ran = json.loads((result.run_dir / "folds" / f"fold_{fold:03d}" / "ran_with.json").read_text())
        assert (ran["device"], ran["amp"], ran["gpus"], ran["workers"]) == ("cpu", False, 0, 1)


def test_one_entry_per_image_in_dataset_order(finished_run):
    result, dataset = finished_run
    with open(result.run_dir / "cleanlab_predictions.pkl", "rb") as f:
        predictions = pickle.load(f)
    assert len(predictions) == dataset.num_images
    assert all(len(p) == dataset.num_classes for p in predictions)
    assert all(a.dtype == np.float32 and a.ndim == 2 and a.shape[1] == 5 for p in predictions for a in p)
    assert np.array_equal(result.image_ids, dataset.image_ids)
    table = pq.read_table(result.run_dir / "predictions.parquet")
    idx = table.column("image_index").to_numpy()
    assert np.all(np.diff(idx) >= 0)
    # Each detection comes from the fold that held its image out.
    assert np.array_equal(table.column("fold").to_numpy(), result.fold_of_image[idx])
    ids = table.column("image_id").to_numpy()
    assert np.array_equal(ids, dataset.image_ids[idx])


def test_labels_equal_the_given_boxes(finished_run):
    result, dataset = finished_run
    with open(result.run_dir / "cleanlab_labels.pkl", "rb") as f:
        labels = pickle.load(f)
    assert len(labels) == dataset.num_images
    for i, lab in enumerate(labels):
        boxes, classes, crowd = dataset.annotations_of(i)
        np.testing.assert_array_equal(lab["bboxes"], boxes[~crowd])
        np.testing.assert_array_equal(lab["labels"], classes[~crowd])
    assert any(len(lab["labels"]) == 0 for lab in labels), "the image without boxes is kept"


def test_cleanlab_reads_the_outputs(finished_run):
    from cleanlab.object_detection.filter import find_label_issues
    from cleanlab.object_detection.rank import get_label_quality_scores

    result, _ = finished_run
    labels, predictions = result.labels, result.predictions
    scores = get_label_quality_scores(labels, predictions)
    assert scores.shape == (len(labels),) and np.all((scores >= 0) & (scores <= 1))
    issues = find_label_issues(labels, predictions)
    assert issues.shape == (len(labels),) and issues.dtype == bool


def test_pycocotools_reads_the_results(finished_run):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    result, dataset = finished_run
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(dataset.annotations_path))
        results = json.loads((result.run_dir / "coco_results.json").read_text())
        assert set(r["category_id"] for r in results) <= set(dataset.category_ids.tolist())
        if results:  # loadRes refuses an empty list; a 4-iteration model may predict nothing
            dt = gt.loadRes(str(result.run_dir / "coco_results.json"))
            ev = COCOeval(gt, dt, "bbox")
            ev.evaluate(); ev.accumulate(); ev.summarize()
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    assert set(metrics["folds"]) == {"0", "1", "2"}
    assert "AP" in metrics["pooled"]


def test_config_json_records_how_to_reproduce(finished_run):
    result, dataset = finished_run
    config = json.loads((result.run_dir / "config.json").read_text())
    assert config["config"]["k"] == 3
    assert config["config"]["train"]["model"] == "tiny"
    assert config["config"]["train"]["overrides"] == TINY
    assert config["dataset_fingerprint"] == dataset.fingerprint
    folds = json.loads((result.run_dir / "folds.json").read_text())
    assert folds["folds"] == result.fold_of_image.tolist()


def test_every_part_records_the_one_model_that_made_it(finished_run):
    from kfold_ray.run._parts import FoldPartStore

    result, _ = finished_run
    store = FoldPartStore(result.run_dir)
    for fold in range(3):
        (model,) = store.models(fold)
        assert model.startswith("model_final.pth:") and len(model) == len("model_final.pth:") + 16


def test_box_losses_score_every_given_box_with_the_model_that_held_it_out(finished_run):
    result, dataset = finished_run
    losses = pq.read_table(result.run_dir / "box_losses.parquet").to_pydict()
    keep = ~dataset.iscrowd
    assert sorted(losses["annotation_id"]) == sorted(dataset.ann_ids[keep].tolist())
    images = np.asarray(losses["image_index"])
    assert np.array_equal(np.asarray(losses["fold"]), result.fold_of_image[images])
    assert np.array_equal(np.asarray(losses["image_id"]), dataset.image_ids[images])
    for name in ("loss_cls", "loss_box_reg"):
        assert np.isfinite(losses[name]).all() and (np.asarray(losses[name]) >= 0).all()
    for name in ("p_given", "p_background"):
        assert ((np.asarray(losses[name]) >= 0) & (np.asarray(losses[name]) <= 1)).all()
    # The cross-entropy of the given class is -log of its probability.
    np.testing.assert_allclose(np.exp(-np.asarray(losses["loss_cls"])), losses["p_given"], rtol=1e-3,
                               atol=1e-6)
