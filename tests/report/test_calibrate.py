"""Cross-fitted score calibration (kfold_ray.report._calibrate) and the ranking's ``calibrate`` option."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
from cocofactory import edit_coco, make_coco

from kfold_ray.report._calibrate import (
    MIN_ISOTONIC,
    calibrate_scores,
    cross_fitted_scores,
    fit_map,
    prediction_is_right,
)
from kfold_ray.data._dataset import load_coco
from kfold_ray.report._objectlab import auxiliary_inputs
from kfold_ray.report._rank import rank_label_issues
from kfold_ray._schema import make_prediction_batch


def _random_predictions(seed: int, n: int = 600, groups: int = 3, classes: int = 2):
    rng = np.random.default_rng(seed)
    scores = rng.uniform(0.05, 1.0, n)
    return (scores, rng.integers(0, classes, n), rng.random(n) < scores, rng.integers(0, groups, n))


def test_a_groups_own_outcomes_never_touch_its_calibrated_scores():
    scores, classes, right, groups = _random_predictions(0)
    before = cross_fitted_scores(scores, classes, right, groups)
    flipped = right.copy()
    flipped[groups == 0] = ~flipped[groups == 0]  # group 0's own labels say the opposite now
    after = cross_fitted_scores(scores, classes, flipped, groups)
    assert np.array_equal(after[groups == 0], before[groups == 0])
    # ... while the maps of the other groups, fitted on group 0 among others, do change.
    assert np.abs(after[groups != 0] - before[groups != 0]).max() > 0.05


def test_each_group_gets_the_map_of_the_other_groups():
    scores, classes, right, groups = _random_predictions(1)
    out = cross_fitted_scores(scores, classes, right, groups)
    for g in range(3):
        for c in range(2):
            mine = (groups == g) & (classes == c)
            train = (groups != g) & (classes == c)
            expected = np.clip(fit_map(scores[train], right[train])(scores[mine]), 1e-6, 1.0)
            assert np.allclose(out[mine], expected)
            within = fit_map(scores[mine | train], right[mine | train])(scores[mine])
            assert not np.allclose(out[mine], within)  # a map that saw the group differs


def test_maps_are_non_decreasing_and_fall_back_when_they_must():
    rng = np.random.default_rng(2)
    s = np.sort(rng.uniform(0, 1, 200))
    iso = fit_map(s, rng.random(200) < s)(s)
    assert np.all(np.diff(iso) >= 0) and iso.min() >= 0 and iso.max() <= 1
    few = s[:MIN_ISOTONIC - 1]
    platt = fit_map(few, few > 0.05)(few)  # too few for isotonic: Platt
    assert np.all(np.diff(platt) >= 0) and not np.allclose(platt, few)
    # Always right at 0.4-0.6: "certain"; never right: "never", whatever the raw score said.
    mid = np.linspace(0.4, 0.6, 50)
    assert fit_map(mid, np.ones(50, bool))(mid).min() > 0.95
    assert fit_map(mid, np.zeros(50, bool))(mid).max() < 0.05
    assert np.array_equal(fit_map(s[:3], np.array([True, False, True]))(s[:3]), s[:3])  # 3 points


def test_right_means_a_given_box_of_its_class_at_iou_half():
    labels = [{"bboxes": np.array([[0, 0, 10, 10]], np.float32), "labels": np.array([1])}]
    rows = np.array([[0, 0, 10, 10, 0.9], [0, 0, 10, 14, 0.8], [0, 0, 10, 30, 0.7]], np.float32)
    predictions = [[rows[:1], rows[1:]]]  # class 0 on the box, class 1 at IoU 0.71 and 0.33
    right = prediction_is_right(auxiliary_inputs(labels, predictions))
    assert right.tolist() == [False, True, False]


def test_calibrate_scores_keeps_the_raw_ones():
    labels = [{"bboxes": np.array([[0, 0, 10, 10]], np.float32), "labels": np.array([0])}] * 4
    predictions = [[np.array([[0, 0, 10, 10, 0.6]], np.float32)]] * 4
    aux = auxiliary_inputs(labels, predictions)
    calibrate_scores(aux, np.array([0, 0, 1, 1]))
    for a in aux:
        assert a["raw_label_probs"].tolist() == pytest.approx([0.6])
        assert a["pred_label_probs"].tolist() == pytest.approx([0.6])  # 2 points a map: identity


# ---- the ranking, end to end ----------------------------------------------------------------------
def _echo_truth(tmp_path, scores: tuple[float, float], swapped: list[int]):
    """A detector that predicts every true box with a score in ``scores``, and labels whose class
    was swapped on the images ``swapped``: (dataset with those labels, predictions)."""
    ann, images = make_coco(tmp_path, n_images=90, categories=2, boxes_per_image=(1, 2), seed=4)
    truth = load_coco(ann, images)
    ids = {int(truth.image_ids[i]) for i in swapped}
    edit_coco(ann, lambda d: [a.update(category_id=3 - a["category_id"]) for a in d["annotations"]
                              if a["image_id"] in ids])
    ds = load_coco(ann, images)
    rng = np.random.default_rng(0)
    det_image = np.repeat(np.arange(truth.num_images), np.diff(truth.ann_offsets))
    folds = np.arange(truth.num_images) % 3
    batches = []
    for f in range(3):
        mine = det_image % 3 == f
        batches.append(make_prediction_batch(
            fold=f, image_indices=np.flatnonzero(folds == f), det_image_index=det_image[mine],
            boxes=truth.boxes[mine], scores=rng.uniform(*scores, int(mine.sum())),
            classes=truth.classes[mine], image_ids=ds.image_ids, category_ids=ds.category_ids))
    return ds, pa.Table.from_batches(batches)


@pytest.fixture
def underconfident(tmp_path):
    """Always right, never confident (scores 0.6-0.7), one swapped class: raw scores hide the
    swap from cleanlab (it trusts >= 0.95 only)."""
    swapped = 7
    return (*_echo_truth(tmp_path, (0.6, 0.7), [swapped]), swapped)


def test_calibration_lets_cleanlab_see_an_underconfident_models_swap(underconfident):
    ds, table, swapped = underconfident
    raw = rank_label_issues(ds, table, calibrate=False)
    assert not any(raw.column("is_issue").to_pylist())
    assert min(raw.column("swap_score").to_pylist()) == 1.0  # cleanlab sees no swap at all
    calibrated = rank_label_issues(ds, table, calibrate=True)
    worst = calibrated.slice(0, 1).to_pylist()[0]
    assert worst["image_index"] == swapped and worst["is_issue"] and worst["swap_score"] < 0.5
    assert worst["issue_kind"] == "swapped"  # the per-box ranking names it either way
    box = json.loads(worst["boxes"])[0]
    assert 0.6 <= box["predicted"]["score"] <= 0.7  # the raw score stays in the output
    assert sum(calibrated.column("is_issue").to_pylist()) == 1


def test_calibration_groups_must_fit_the_dataset(underconfident):
    ds, table, _ = underconfident
    with pytest.raises(ValueError, match="calibration_groups"):
        rank_label_issues(ds, table, calibrate=True, calibration_groups=np.zeros(3, dtype=int))


def test_calibration_caps_a_confident_model_at_the_labels_accuracy(tmp_path):
    # Why calibration is off by default: fitted against labels with errors (here 9 swapped images
    # of 90), the map cannot go above the share of predictions the labels call right, so a
    # confident, accurate detector's 0.99 falls under cleanlab's 0.95 and its swaps go unseen.
    swapped = list(range(0, 90, 10))
    ds, table = _echo_truth(tmp_path, (0.985, 0.995), swapped)
    found = lambda t: {r["image_index"] for r in t.to_pylist()  # noqa: E731
                       if r["is_issue"] and r["swap_score"] < 0.5}
    assert found(rank_label_issues(ds, table, calibrate=False)) == set(swapped)
    assert len(found(rank_label_issues(ds, table, calibrate=True))) < len(swapped) / 2
