"""benchmarks/label_error_protocol.py injects label errors by Schubert et al. 2023's rules, and
benchmarks/label_error_scores.py scores them the way the benchmark reports."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.label_error_protocol import inject_errors, xywh_iou  # noqa: E402
from benchmarks.label_error_scores import auroc, auroc_interval  # noqa: E402


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    from kfold_ray.data._example import make_digits_example

    ex = make_digits_example(tmp_path_factory.mktemp("digits"), n_images=120, corrupt_fraction=0.0)
    return json.loads(ex.clean_annotations_path.read_text())


def test_five_percent_of_each_kind_one_error_a_box(clean):
    corrupted, records = inject_errors(clean, seed=3)
    n = len(clean["annotations"])
    counts = Counter(r["protocol_kind"] for r in records)
    assert set(counts.values()) == {round(0.05 * n)} and len(counts) == 4
    touched = [r["annotation_id"] for r in records if r["protocol_kind"] != "spawn"]
    touched += [r["source_annotation_id"] for r in records if r["protocol_kind"] == "spawn"]
    assert len(touched) == len(set(touched))  # at most one error a box
    assert inject_errors(clean, seed=3) == (corrupted, records)  # deterministic
    assert inject_errors(clean, seed=4)[1] != records


def test_each_kind_follows_its_rule(clean):
    corrupted, records = inject_errors(clean, seed=0)
    before = {a["id"]: a for a in clean["annotations"]}
    after = {a["id"]: a for a in corrupted["annotations"]}
    size = {im["id"]: (im["width"], im["height"]) for im in clean["images"]}
    for r in records:
        kind, a = r["protocol_kind"], after.get(r["annotation_id"])
        if kind == "drop":
            assert a is None and r["corrupted_bbox"] is None
        elif kind == "flip":
            assert a["category_id"] != before[a["id"]]["category_id"] and a["bbox"] == before[a["id"]]["bbox"]
        elif kind == "shift":
            assert 0.4 <= xywh_iou(a["bbox"], before[a["id"]]["bbox"]) < 0.7
            w, h = size[a["image_id"]]
            x, y, bw, bh = a["bbox"]
            assert x >= 0 and y >= 0 and x + bw <= w and y + bh <= h
        else:  # spawn: a copy of a true box (class, size) in another image, inside it
            source = before[r["source_annotation_id"]]
            assert a["image_id"] != source["image_id"] and a["category_id"] == source["category_id"]
            assert a["bbox"][2:] == source["bbox"][2:]
            w, h = size[a["image_id"]]
            assert a["bbox"][0] + a["bbox"][2] <= w + 0.01 and a["bbox"][1] + a["bbox"][3] <= h + 0.01
    assert len(corrupted["annotations"]) == len(clean["annotations"])  # as many spawned as dropped


def test_auroc_and_its_interval():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    pos, neg = rng.normal(1, 1, 40), np.r_[rng.normal(0, 1, 300), [1.0, 1.0]]
    pos[:3] = 1.0  # ties count half
    expected = roc_auc_score(np.r_[np.ones(40), np.zeros(302)], np.r_[pos, neg])
    assert auroc(pos, neg) == pytest.approx(expected)
    lo, hi = auroc_interval(pos, neg, reps=300)
    assert lo < expected < hi and hi - lo < 0.25
    assert auroc([], neg) is None


def test_excluded_negatives_file_names_images_and_refuses_unknown_ones(tmp_path):
    from benchmarks.label_error_scores import _excluded_ids

    images = {"file_name": ["JPEGImages/a.jpg", "JPEGImages/b.jpg", "c.jpg"], "image_id": [7, 8, 9]}
    listed = tmp_path / "judged.txt"
    listed.write_text("# judged by eye\nJPEGImages/a.jpg  # unboxed cells\n\nc.jpg\nb.jpg\n")
    assert _excluded_ids(listed, images) == {7, 8, 9}
    listed.write_text("a.jpg\nd.jpg\n")
    with pytest.raises(SystemExit, match=r"judged.txt: line 2: 'd.jpg' is no image"):
        _excluded_ids(listed, images)
