"""The built-in digits example: exact ground truth, and injected errors that match the files."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kfold_ray.data._example import ERROR_KINDS, ExampleDataset, make_digits_example
from kfold_ray._exceptions import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def _load(path: Path) -> dict | list:
    return json.loads(path.read_text())


def _files(ex: ExampleDataset) -> dict[str, bytes]:
    out = {
        p.name: p.read_bytes()
        for p in (ex.annotations_path, ex.clean_annotations_path, ex.injected_errors_path)
    }
    out.update({p.name: p.read_bytes() for p in sorted(ex.image_dir.glob("*.png"))})
    return out


def _iou(a: list[float], b: list[float]) -> float:
    ix = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


@pytest.fixture(scope="module")
def example(tmp_path_factory) -> ExampleDataset:
    return make_digits_example(tmp_path_factory.mktemp("digits"), n_images=150, seed=3)


def test_writes_the_promised_files(example: ExampleDataset) -> None:
    clean = _load(example.clean_annotations_path)
    assert example.annotations_path.name == "annotations.json"
    assert example.image_dir.name == "images"
    assert [im["file_name"] for im in clean["images"]][:2] == ["digits_0001.png", "digits_0002.png"]
    assert [c["id"] for c in clean["categories"]] == list(range(1, 11))
    assert [c["name"] for c in clean["categories"]] == [str(d) for d in range(10)]
    for im in clean["images"]:
        with Image.open(example.image_dir / im["file_name"]) as img:
            assert img.mode == "RGB"
            assert img.size == (im["width"], im["height"]) == (128, 128)
    per_image = Counter(a["image_id"] for a in clean["annotations"])
    assert set(per_image) == {im["id"] for im in clean["images"]}  # every image has a digit
    assert max(per_image.values()) <= 4
    assert len({a["id"] for a in clean["annotations"]}) == len(clean["annotations"])
    # Nothing but the outputs (no temporary files left behind by the atomic writes).
    names = {p.name for p in example.annotations_path.parent.iterdir()}
    assert names == {"annotations.json", "annotations_clean.json", "injected_errors.json", "images"}
    assert len(list(example.image_dir.iterdir())) == 150


def test_same_seed_same_bytes_other_seed_other_data(tmp_path: Path) -> None:
    a = make_digits_example(tmp_path / "a", n_images=20, seed=7)
    b = make_digits_example(tmp_path / "b", n_images=20, seed=7)
    c = make_digits_example(tmp_path / "c", n_images=20, seed=8)
    assert _files(a) == _files(b)
    assert _load(a.clean_annotations_path) != _load(c.clean_annotations_path)


def test_boxes_are_tight_inside_and_disjoint(example: ExampleDataset) -> None:
    clean = _load(example.clean_annotations_path)
    gray = {
        im["id"]: np.asarray(Image.open(example.image_dir / im["file_name"]), float).mean(axis=2)
        for im in clean["images"]
    }
    threshold = 66.0  # background stays below ~45, drawn ink above ~85 (measured margins)
    boxes_of: dict[int, list[list[int]]] = {}
    for ann in clean["annotations"]:
        g = gray[ann["image_id"]]
        x, y, w, h = ann["bbox"]
        assert w > 0 and h > 0 and ann["area"] == w * h and ann["iscrowd"] == 0
        assert 0 <= x and 0 <= y and x + w <= g.shape[1] and y + h <= g.shape[0]
        inside = g[y : y + h, x : x + w]
        # Tight: ink touches each of the box's four edges ...
        for edge in (inside[0], inside[-1], inside[:, 0], inside[:, -1]):
            assert edge.max() > threshold, ann
        # ... and the one-pixel ring just outside the box is background.
        ring = np.pad(g, 1)[y : y + h + 2, x : x + w + 2].copy()
        ring[1:-1, 1:-1] = 0.0
        assert ring.max() < threshold, ann
        boxes_of.setdefault(ann["image_id"], []).append(ann["bbox"])
    for boxes in boxes_of.values():
        for i, a in enumerate(boxes):
            for b in boxes[i + 1 :]:
                assert _iou(a, b) == 0.0


def test_injected_errors_are_exactly_the_difference(example: ExampleDataset) -> None:
    clean = _load(example.clean_annotations_path)
    corrupted = _load(example.annotations_path)
    errors = _load(example.injected_errors_path)
    assert clean["images"] == corrupted["images"]
    assert clean["categories"] == corrupted["categories"]

    before = {a["id"]: a for a in clean["annotations"]}
    after = {a["id"]: a for a in corrupted["annotations"]}
    assert set(after) <= set(before)
    diff: dict[int, str] = {i: "missing" for i in set(before) - set(after)}
    for i, a in after.items():
        changed = {k for k in a if a[k] != before[i][k]}
        assert changed in (set(), {"category_id"}, {"bbox"}), changed
        if changed == {"category_id"}:
            diff[i] = "swapped"
        elif changed == {"bbox"}:
            diff[i] = "shifted"
    assert diff == {e["annotation_id"]: e["kind"] for e in errors}

    file_of = {im["id"]: im["file_name"] for im in clean["images"]}
    for e in errors:
        orig = before[e["annotation_id"]]
        assert e["image_id"] == orig["image_id"] and e["file_name"] == file_of[e["image_id"]]
        assert (e["original_bbox"], e["original_category_id"]) == (
            orig["bbox"],
            orig["category_id"],
        )
        if e["kind"] == "missing":
            assert e["corrupted_bbox"] is None and e["corrupted_category_id"] is None
            continue
        now = after[e["annotation_id"]]
        assert (e["corrupted_bbox"], e["corrupted_category_id"]) == (
            now["bbox"],
            now["category_id"],
        )
        if e["kind"] == "swapped":
            assert now["category_id"] != orig["category_id"] and 1 <= now["category_id"] <= 10
        else:
            x, y, w, h = now["bbox"]
            assert (w, h) == tuple(orig["bbox"][2:])
            assert 0 <= x and 0 <= y and x + w <= 128 and y + h <= 128
            assert _iou(now["bbox"], orig["bbox"]) < 0.2
    assert [e["image_id"] for e in errors] == sorted({e["image_id"] for e in errors})


@pytest.mark.parametrize(
    ("n_images", "fraction", "expected"), [(150, 0.1, 15), (40, 0.25, 10), (10, 1.0, 10)]
)
def test_fraction_of_corrupted_images(tmp_path, n_images, fraction, expected) -> None:
    ex = make_digits_example(tmp_path, n_images=n_images, corrupt_fraction=fraction)
    errors = _load(ex.injected_errors_path)
    assert len(errors) == expected
    assert len({e["image_id"] for e in errors}) == expected  # one error per corrupted image


@pytest.mark.parametrize(("n_images", "seed"), [(60, 0), (61, 1), (97, 2), (150, 5)])
def test_every_kind_present_in_equal_shares(tmp_path, n_images, seed) -> None:
    ex = make_digits_example(tmp_path, n_images=n_images, seed=seed)
    counts = Counter(e["kind"] for e in _load(ex.injected_errors_path))
    assert set(counts) == set(ERROR_KINDS)
    assert max(counts.values()) - min(counts.values()) <= 1


def test_missing_prefers_images_that_keep_other_boxes(example: ExampleDataset) -> None:
    corrupted = _load(example.annotations_path)
    left = Counter(a["image_id"] for a in corrupted["annotations"])
    missing = [e for e in _load(example.injected_errors_path) if e["kind"] == "missing"]
    assert missing and all(left[e["image_id"]] >= 1 for e in missing)


def test_zero_fraction_means_clean_labels(tmp_path: Path) -> None:
    ex = make_digits_example(tmp_path, n_images=12, corrupt_fraction=0.0)
    assert _load(ex.injected_errors_path) == []
    assert _load(ex.annotations_path)["annotations"] == _load(ex.clean_annotations_path)[
        "annotations"
    ]


def test_other_image_size(tmp_path: Path) -> None:
    ex = make_digits_example(tmp_path, n_images=8, image_size=64)
    for ann in _load(ex.clean_annotations_path)["annotations"]:
        x, y, w, h = ann["bbox"]
        assert x + w <= 64 and y + h <= 64 and w >= 3 and h >= 10


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_images": 0}, "n_images must be an integer >= 1, got 0"),
        ({"image_size": 16}, "image_size must be an integer >= 32"),
        ({"seed": -1}, "seed must be an integer >= 0"),
        ({"corrupt_fraction": 1.5}, r"corrupt_fraction must be in \[0, 1\], got 1.5"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, match) -> None:
    with pytest.raises(ConfigError, match=match):
        make_digits_example(tmp_path, **kwargs)
    assert not (tmp_path / "annotations.json").exists()


def test_pycocotools_reads_it(example: ExampleDataset) -> None:
    coco_mod = pytest.importorskip("pycocotools.coco")
    coco = coco_mod.COCO(str(example.annotations_path))
    assert len(coco.getImgIds()) == 150 and len(coco.getCatIds()) == 10


def test_script(tmp_path: Path) -> None:
    out = tmp_path / "ex"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "make_digits.py"), "--out", str(out),
         "--images", "6", "--seed", "1"],
        capture_output=True, text=True, check=True,
    )
    assert str(out / "annotations.json") in proc.stdout
    assert len(_load(out / "annotations_clean.json")["images"]) == 6
