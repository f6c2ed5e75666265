"""Applying a review to the dataset: COCO fixes files (ids kept, renumbered as CVAT does, or
FiftyOne's ``coco_id``), Label Studio exports written by hand, and bad input.

Every expected value here is a literal: the boxes a reviewer drew, in the units of the tool.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest

from kfold_ray import DatasetError
from kfold_ray._api import apply_fixes
from kfold_ray._cli import main


@pytest.fixture
def dataset(finished_run):
    _, ann, _ = finished_run
    return ann, json.loads(ann.read_text())


def _coco_fixes(doc: dict, image_ids: list[int]) -> dict:
    """The reviewed images as a COCO file, as our COCO export writes them (ids kept)."""
    return {"images": [copy.deepcopy(im) for im in doc["images"] if im["id"] in image_ids],
            "annotations": [copy.deepcopy(a) for a in doc["annotations"] if a["image_id"] in image_ids],
            "categories": copy.deepcopy(doc["categories"])}


def _four_changes(fixes: dict) -> dict:
    """On image 1000 (96x80): 5000 moved, 5003 becomes class_1, 5006 deleted, one box added."""
    anns = fixes["annotations"]
    next(a for a in anns if a["id"] == 5000)["bbox"] = [24, 6, 30, 18]
    next(a for a in anns if a["id"] == 5003)["category_id"] = 7
    fixes["annotations"] = [a for a in anns if a["id"] != 5006]
    fixes["annotations"].append({"id": 1, "image_id": 1000, "category_id": 3, "bbox": [72, 50, 18, 25],
                                 "area": 450, "iscrowd": 0})
    return fixes


def _expected_after_four_changes(original: dict) -> dict:
    expected = copy.deepcopy(original)
    anns = expected["annotations"]
    moved = next(a for a in anns if a["id"] == 5000)
    moved.update(bbox=[24, 6, 30, 18], area=540)
    next(a for a in anns if a["id"] == 5003)["category_id"] = 7
    expected["annotations"] = [a for a in anns if a["id"] != 5006] + [
        {"id": 5049, "image_id": 1000, "category_id": 3, "bbox": [72, 50, 18, 25], "area": 450, "iscrowd": 0}]
    return expected


def test_coco_fixes_with_the_datasets_ids(dataset, tmp_path):
    ann, original = dataset
    fixes = _four_changes(_coco_fixes(original, [1000, 986]))
    (tmp_path / "fixes.json").write_text(json.dumps(fixes))
    done = apply_fixes(ann, tmp_path / "fixes.json", out=tmp_path / "new.json")
    assert json.loads((tmp_path / "new.json").read_text()) == _expected_after_four_changes(original)
    assert done.reviewed_images == 2
    assert sorted((c["annotation_id"], c["change"], c["before"], c["after"]) for c in done.changes) == [
        (5000, "moved", "[20, 2, 32, 20]", "[24, 6, 30, 18]"),
        (5003, "reclassified", "class_0", "class_1"),
        (5006, "deleted", "class_1 [63, 37, 32, 29]", ""),
        (5049, "added", "", "class_0 [72, 50, 18, 25]"),
    ]
    table = (tmp_path / "new.changes.csv").read_text().splitlines()
    assert table[0] == "image_id,file_name,annotation_id,change,before,after" and len(table) == 5
    assert json.loads(ann.read_text()) == original, "the original is never touched"


def test_coco_fixes_renumbered_as_cvat_does(dataset, tmp_path):
    """CVAT renumbers images, annotations and categories from 1 and writes base names: matched
    by file name, class name and overlap."""
    ann, original = dataset
    fixes = _four_changes(_coco_fixes(original, [1000, 979]))
    fixes["categories"] = [{"id": 1, "name": "class_1", "supercategory": ""},
                           {"id": 2, "name": "class_0", "supercategory": ""}]
    new_cat = {7: 1, 3: 2}
    new_image = {1000: 1, 979: 2}
    for im in fixes["images"]:
        im["id"] = new_image[im["id"]]
        im["file_name"] = im["file_name"].rsplit("/", 1)[-1]  # "sub dir/bild_ä_ø.png" -> "bild_ä_ø.png"
    for k, a in enumerate(fixes["annotations"]):
        a.update(id=k + 1, image_id=new_image[a["image_id"]], category_id=new_cat[a["category_id"]])
    (tmp_path / "cvat.json").write_text(json.dumps(fixes))
    done = apply_fixes(ann, tmp_path / "cvat.json", out=tmp_path / "new.json")
    assert json.loads((tmp_path / "new.json").read_text()) == _expected_after_four_changes(original)
    assert len(done.changes) == 4


def test_fiftyone_coco_keeps_our_ids_in_coco_id(dataset, tmp_path):
    ann, original = dataset
    fixes = _four_changes(_coco_fixes(original, [1000]))
    for k, a in enumerate(fixes["annotations"]):
        if a["id"] != 1:
            a["coco_id"] = a["id"]
        a.update(id=100 + k, image_id=1)
    fixes["annotations"][-1]["coco_id"] = None  # a box drawn in the tool has no id of ours
    fixes["images"][0].update(id=1, file_name="img_00000.png")
    (tmp_path / "labels.json").write_text(json.dumps(fixes))
    # A box that moved a long way (IoU 0) still matches by its coco_id.
    fixes["annotations"][0]["bbox"] = [60, 50, 30, 18]
    (tmp_path / "far.json").write_text(json.dumps(fixes))
    apply_fixes(ann, tmp_path, out=tmp_path / "new.json")  # a folder: its labels.json
    assert json.loads((tmp_path / "new.json").read_text()) == _expected_after_four_changes(original)
    done = apply_fixes(ann, tmp_path / "far.json", out=tmp_path / "far-new.json")
    assert ("moved", 5000) in [(c["change"], c["annotation_id"]) for c in done.changes]


def test_labelstudio_export_by_hand(dataset, tmp_path):
    ann, original = dataset
    region = lambda rid, x, y, w, h, label: {  # noqa: E731
        "id": rid, "type": "rectanglelabels", "from_name": "label", "to_name": "image",
        "original_width": 96, "original_height": 80, "image_rotation": 0,
        "value": {"x": x, "y": y, "width": w, "height": h, "rotation": 0, "rectanglelabels": [label]}}
    task = {"id": 7, "data": {"image": "/data/local-files/?d=img_00000.png", "kfold_ray_image_id": 1000,
                              "kfold_ray_annotation_ids": [5000, 5003, 5006]},
            "annotations": [
                {"id": 1, "was_cancelled": False, "updated_at": "2026-12-01T10:00:00Z", "result": []},
                {"id": 2, "was_cancelled": True, "updated_at": "2026-12-01T12:00:00Z", "result": []},
                {"id": 3, "was_cancelled": False, "updated_at": "2026-12-01T11:00:00Z", "result": [
                    region("ann5000", 25.0, 7.5, 31.25, 22.5, "class_1"),
                    region("ann5003", 67.70833333333333, 51.25, 16.666666666666668, 21.25, "class_1"),
                    region("x7Gq2", 75.0, 62.5, 18.75, 31.25, "class_0"),
                    {"id": "c1", "type": "choices", "from_name": "ok", "to_name": "image",
                     "value": {"choices": ["checked"]}},
                ]}]}
    untouched = {"id": 8, "data": {"kfold_ray_image_id": 986}, "annotations": []}
    (tmp_path / "ls.json").write_text(json.dumps([task, untouched]))
    done = apply_fixes(ann, tmp_path / "ls.json", out=tmp_path / "new.json")
    assert json.loads((tmp_path / "new.json").read_text()) == _expected_after_four_changes(original)
    assert done.reviewed_images == 1


BAD = {
    "image not in the dataset": (lambda f: f["images"][0].update(file_name="nope.png"),
                                 r"fixes.json: images\[0\] \(id 1000, 'nope.png'\): image 'nope.png' is not in the dataset"),
    "unknown class": (lambda f: f["categories"].append({"id": 9, "name": "dog"}) or f["annotations"][0].update(category_id=9),
                      r"fixes.json: annotations\[0\] \(id 5000\): class 'dog' is not a category of the dataset \('class_0', 'class_1'\)"),
    "box outside its image": (lambda f: f["annotations"][1].update(bbox=[90, 70, 20, 20]),
                              r"fixes.json: annotations\[1\] \(id 5003\): box \[90, 70, 20, 20\] reaches outside its image 1000 \(96x80\)"),
    "wrong format": (lambda f: f.pop("categories"),
                     r"fixes.json: neither a Label Studio JSON export .* nor a COCO json"),
    "resized image": (lambda f: f["images"][0].update(width=192, height=160),
                      r"image 'img_00000.png' is 192x160 in the fixes file but 96x80 in the dataset"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_fixes_exit_2_with_one_line_and_write_nothing(case, dataset, tmp_path, capsys):
    ann, original = dataset
    spoil, pattern = BAD[case]
    fixes = _coco_fixes(original, [1000])
    spoil(fixes)
    (tmp_path / "fixes.json").write_text(json.dumps(fixes))
    code = main(["apply", "--annotations", str(ann), "--fixes", str(tmp_path / "fixes.json"),
                 "--out", str(tmp_path / "new.json")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("kfold-ray: error: ") and __import__("re").search(pattern, err), err
    assert not (tmp_path / "new.json").exists() and not (tmp_path / "new.changes.csv").exists()


def test_labelstudio_shapes_that_are_no_box_are_refused(dataset, tmp_path):
    ann, _ = dataset
    task = {"id": 3, "data": {"kfold_ray_image_id": 1000}, "annotations": [{"result": [
        {"id": "p1", "type": "polygonlabels", "value": {"points": [[1, 1], [5, 1], [5, 5]],
                                                        "polygonlabels": ["class_0"]}}]}]}
    (tmp_path / "ls.json").write_text(json.dumps([task]))
    with pytest.raises(DatasetError, match=r"task 3, annotation \?, region 'p1': a 'polygonlabels' "
                                           r"region cannot become a COCO box"):
        apply_fixes(ann, tmp_path / "ls.json", out=tmp_path / "new.json")
    task["annotations"][0]["result"] = [{"id": "ann5000", "type": "rectanglelabels", "value": {
        "x": 1, "y": 1, "width": 10, "height": 10, "rotation": 30, "rectanglelabels": ["class_0"]}}]
    (tmp_path / "ls.json").write_text(json.dumps([task]))
    with pytest.raises(DatasetError, match=r"rotated by 30 degrees"):
        apply_fixes(ann, tmp_path / "ls.json", out=tmp_path / "new.json")


def test_unreviewed_records_are_kept_whole(dataset, tmp_path):
    """Top-level keys, unknown fields, order: only the changed annotations differ."""
    ann, original = dataset
    original["licenses"] = [{"id": 1, "name": "CC-BY"}]
    original["annotations"][1]["attributes"] = {"occluded": True}
    original["images"][0]["flickr_url"] = "http://x/y.jpg"
    ann.write_text(json.dumps(original))
    fixes = _coco_fixes(original, [1000])
    fixes["annotations"][1]["category_id"] = 7  # 5003 reclassified, keeps its attributes
    (tmp_path / "fixes.json").write_text(json.dumps(fixes))
    apply_fixes(ann, tmp_path / "fixes.json", out=tmp_path / "new.json")
    new = json.loads((tmp_path / "new.json").read_text())
    assert list(new) == list(original)
    expected = copy.deepcopy(original)
    expected["annotations"][1]["category_id"] = 7
    assert new == expected


def test_no_change_and_the_default_out(dataset, tmp_path):
    ann, original = dataset
    (tmp_path / "fixes.json").write_text(json.dumps(_coco_fixes(original, [1000, 993, 958])))
    proc = subprocess.run([sys.executable, "-m", "kfold_ray._cli", "apply", "--annotations", str(ann),
                           "--fixes", str(tmp_path / "fixes.json")], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == "3 reviewed images: no change"
    out = ann.with_name("annotations.fixed.json")
    assert json.loads(out.read_text()) == original
    assert ann.with_name("annotations.fixed.changes.csv").read_text().count("\n") == 1
    code = main(["apply", "--annotations", str(ann), "--fixes", str(tmp_path / "fixes.json"),
                 "--out", str(ann)])
    assert code == 2
