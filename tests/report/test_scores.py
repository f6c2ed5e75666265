"""The flat pass over every (given box, prediction) pair (`_pairs`, `_scores`) gives the same
cleanlab scores and flags as the per-image reference (`_objectlab`, itself checked against
cleanlab in test_objectlab.py), whatever the chunking; and the per-box signals it feeds."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from cocofactory import make_coco

from kfold_ray._schema import make_prediction_batch
from kfold_ray.data._dataset import load_coco
from kfold_ray.outputs._writers import cleanlab_predictions
from kfold_ray.report import _objectlab as reference
from kfold_ray.report._pairs import flatten, pair_chunks
from kfold_ray.report._scores import cleanlab_scores, pair_stats


def _run(tmp_path, seed: int):
    """A dataset (an image without boxes, a crowd box, 4 classes) and predictions: most given
    boxes predicted (jittered; some of another class; many confident), plus boxes anywhere."""
    ann, images = make_coco(tmp_path, n_images=40, categories=4, boxes_per_image=(0, 5),
                            seed=seed, awkward=True)
    ds = load_coco(ann, images)
    rng = np.random.default_rng(seed)
    owner, boxes, scores, classes = [], [], [], []
    for i in range(ds.num_images):
        b, c, _ = ds.annotations_of(i)
        for j in range(len(b)):
            if rng.random() < 0.8:
                owner.append(i)
                boxes.append(b[j] + rng.normal(0, 3, 4))
                scores.append(rng.choice([0.99, 0.97, rng.uniform(0.05, 1)]))
                classes.append(c[j] if rng.random() < 0.8 else rng.integers(4))
        for _ in range(rng.integers(0, 4)):
            xy = rng.uniform(0, 60, 2)
            owner.append(i)
            boxes.append(np.r_[xy, xy + rng.uniform(3, 30, 2)])
            scores.append(rng.uniform(0.05, 1))
            classes.append(rng.integers(4))
    order = np.lexsort((-np.array(scores), np.array(owner)))
    batch = make_prediction_batch(
        fold=0, image_indices=np.arange(ds.num_images), det_image_index=np.array(owner)[order],
        boxes=np.array(boxes)[order], scores=np.array(scores)[order],
        classes=np.array(classes)[order], image_ids=ds.image_ids, category_ids=ds.category_ids)
    return ds, pa.Table.from_batches([batch])


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("max_pairs", [1, 50, 2_000_000])
def test_flat_scores_equal_the_per_image_ones(tmp_path, monkeypatch, seed, max_pairs):
    from cleanlab.object_detection import rank as cl_rank

    monkeypatch.setattr(pair_chunks, "__defaults__", (max_pairs,))  # one image a chunk .. all in one
    ds, table = _run(tmp_path, seed)
    aux = reference.auxiliary_inputs(ds.cleanlab_labels(), cleanlab_predictions(
        table, num_images=ds.num_images, num_classes=ds.num_classes))
    per_box = reference.box_scores(aux)
    pooled = {k: np.asarray(cl_rank.pool_box_scores_per_image(v)) for k, v in per_box.items()}
    flat = flatten(ds, table)
    stats = pair_stats(flat, flat.p_score)
    assert stats.floor == aux[0]["min_possible_similarity"]
    ours, quality, issue = cleanlab_scores(flat, flat.p_score, stats, ds.num_classes)
    for kind in pooled:
        np.testing.assert_allclose(ours[kind], pooled[kind], rtol=1e-12, atol=1e-15, err_msg=kind)
    np.testing.assert_allclose(quality, reference.label_quality_scores(pooled), rtol=1e-12)
    assert np.array_equal(issue, reference.find_label_issues(aux, per_box, ds.num_classes))
    assert issue.any() and not issue.all()
    # the flat per-box arrays line up with cleanlab's per-image ones
    np.testing.assert_allclose(stats.best_iou, np.concatenate(
        [a["iou_matrix"].max(axis=0, initial=0.0) for a in aux]))


def test_claims_and_covers(tmp_path):
    """A given box claims its best box (largest IoU x score, any class); the covers are the best
    scores of its class / another class at IoU >= 0.5."""
    ann, images = make_coco(tmp_path, n_images=1, categories=3, boxes_per_image=(1, 1), seed=0)
    with pytest.warns(UserWarning, match="no .non-crowd. annotations"):
        ds = load_coco(ann, images)
    x1, y1, x2, y2 = ds.boxes[0]
    w = x2 - x1
    c = int(ds.classes[0])
    rows = np.array([[x1, y1, x2, y2], [x1 + 0.3 * w, y1, x2 + 0.3 * w, y2], [x1, y1, x2, y2]])
    batch = make_prediction_batch(
        fold=0, image_indices=np.arange(1), det_image_index=np.zeros(3, int), boxes=rows,
        scores=np.array([0.3, 0.9, 0.6]), classes=np.array([c, c, (c + 1) % 3]),
        image_ids=ds.image_ids, category_ids=ds.category_ids)
    flat = flatten(ds, pa.Table.from_batches([batch]))
    s = pair_stats(flat, flat.p_score)
    # IoU x score: 1.0 x 0.3, 0.54 x 0.9 = 0.48, 1.0 x 0.6 (another class): the last one
    assert flat.p_table_row[s.claim[0]] == 2 and s.claim_iou[0] == pytest.approx(1.0)
    assert s.cover_same[0] == pytest.approx(0.9) and s.cover_other[0] == pytest.approx(0.6)
    assert s.cover_other_class[0] == (c + 1) % 3
    in_table_order = s.best_iou[np.argsort(flat.p_table_row)]
    assert in_table_order.tolist() == pytest.approx([1.0, 0.7 / 1.3, 1.0], rel=1e-3)
