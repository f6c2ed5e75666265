"""kfold_ray.report._objectlab gives cleanlab's own image scores and issue flags, without its pools."""

from __future__ import annotations

import numpy as np
import pytest

from kfold_ray.report._objectlab import (
    box_scores,
    find_label_issues,
    label_quality_scores,
    per_class_ap,
)
from kfold_ray.report._objectlab import auxiliary_inputs


def _random_dataset(seed: int, n_images: int = 60, num_classes: int = 4):
    """Labels and predictions where many predictions sit on given boxes (some of another class,
    some shifted, some confident), so that every subtype and AP threshold is exercised."""
    rng = np.random.default_rng(seed)
    labels, predictions = [], []
    for i in range(n_images):
        n = int(rng.integers(0, 5)) if i % 7 else 0
        xy = rng.uniform(0, 100, (n, 2))
        boxes = np.c_[xy, xy + rng.uniform(8, 40, (n, 2))]
        classes = rng.integers(0, num_classes, n)
        if n and i % 5 == 0:  # the same object labelled twice, as two classes (swap's floor)
            boxes = np.r_[boxes, boxes[:1] + 0.1]
            classes = np.r_[classes, (classes[:1] + 1) % num_classes]
            n += 1
        labels.append({"bboxes": boxes.astype(np.float32), "labels": classes})
        near = boxes + rng.normal(0, 3, boxes.shape)  # predictions on the given boxes
        keep = rng.random(n) < 0.8
        far_xy = rng.uniform(0, 100, (int(rng.integers(0, 4)), 2))
        far = np.c_[far_xy, far_xy + rng.uniform(8, 40, far_xy.shape)]
        rows = np.r_[near[keep], far]
        cls = np.r_[np.where(rng.random(n) < 0.15, rng.integers(0, num_classes, n), classes)[keep],
                    rng.integers(0, num_classes, len(far))]
        score = np.where(rng.random(len(rows)) < 0.5, rng.uniform(0.9, 1.0, len(rows)),
                         rng.uniform(0.05, 0.9, len(rows)))
        rows = np.c_[rows, score].astype(np.float32)
        predictions.append([rows[cls == c][np.argsort(-rows[cls == c][:, 4])]
                            for c in range(num_classes)])
    return labels, predictions


def _cleanlab_per_box(aux):
    from cleanlab.object_detection import rank as cl_rank

    return {"overlooked": cl_rank.compute_overlooked_box_scores(auxiliary_inputs=aux),
            "swapped": cl_rank.compute_swap_box_scores(auxiliary_inputs=aux),
            "badly_located": cl_rank.compute_badloc_box_scores(auxiliary_inputs=aux)}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_same_flags_and_scores_as_cleanlab(seed):
    from cleanlab.object_detection import filter as cl_filter
    from cleanlab.object_detection import rank as cl_rank
    from cleanlab.object_detection.filter import _get_per_class_ap

    labels, predictions = _random_dataset(seed)
    aux = auxiliary_inputs(labels, predictions)
    per_box = _cleanlab_per_box(aux)
    theirs_ap = _get_per_class_ap(labels, predictions)
    ours_ap = per_class_ap(aux, 4) * 0.25
    assert np.allclose(ours_ap, [theirs_ap[c] for c in range(4)], atol=1e-6)
    assert 0 < ours_ap.min() and ours_ap.max() < 0.25  # neither trivial nor perfect
    theirs = np.asarray(cl_filter.find_label_issues(labels, predictions), dtype=bool)
    ours = find_label_issues(aux, per_box, 4)
    assert np.array_equal(ours, theirs)
    assert 0 < ours.sum() < len(ours)
    pooled = {k: cl_rank.pool_box_scores_per_image(v) for k, v in per_box.items()}
    expected = cl_rank.get_label_quality_scores(labels, predictions, verbose=False)
    assert np.allclose(label_quality_scores(pooled), expected, atol=1e-9)


def test_the_per_box_scores_are_left_as_they_were():
    labels, predictions = _random_dataset(3)
    aux = auxiliary_inputs(labels, predictions)
    per_box = _cleanlab_per_box(aux)
    before = {k: [s.copy() for s in v] for k, v in per_box.items()}
    find_label_issues(aux, per_box, 4)
    for k in per_box:  # cleanlab's own version writes 1.0 over NaNs in place
        assert all(np.array_equal(a, b, equal_nan=True) for a, b in zip(per_box[k], before[k]))


@pytest.mark.parametrize("seed", [0, 4])
def test_same_per_box_scores_as_cleanlab(seed):
    labels, predictions = _random_dataset(seed)
    aux = auxiliary_inputs(labels, predictions)
    theirs, ours = _cleanlab_per_box(aux), box_scores(aux)
    for kind in theirs:
        assert len(ours[kind]) == len(theirs[kind])
        for a, b in zip(ours[kind], theirs[kind]):
            assert np.allclose(a, b, equal_nan=True, rtol=0, atol=1e-12), kind
    # Every branch was taken: applicable and not, conflicting labels, no evidence (1.0).
    flat = {k: np.concatenate(v) for k, v in ours.items()}
    assert np.isnan(flat["overlooked"]).any() and (~np.isnan(flat["overlooked"])).any()
    floor = aux[0]["min_possible_similarity"]
    assert (flat["swapped"] == floor).any() and (flat["swapped"] == 1).any() and (flat["swapped"] < 1).any()
    assert (flat["badly_located"] == 1).any() and (flat["badly_located"] < 1).any()
