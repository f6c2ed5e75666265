"""A real Label Studio server (tests/review/conftest.py) imports our tasks through its SDK; a
correction is submitted as Label Studio result JSON written here (a box moved, a class changed,
a box deleted, one added), fetched back through the server's own export, and `kfold-ray apply`
turns it into a COCO json checked against literal numbers.

The image is 1000 (96 x 80 px) of the finished-run fixture; Label Studio's rectangles are in
percent of the image: x 25 % of 96 px is 24 px, y 7.5 % of 80 px is 6 px, and so on.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest

from kfold_ray._cli import main

# The reviewer's correction of image 1000, as Label Studio's editor saves it.
MOVED = {"id": "ann5000", "type": "rectanglelabels", "from_name": "label", "to_name": "image",
         "original_width": 96, "original_height": 80, "image_rotation": 0,
         "value": {"x": 25.0, "y": 7.5, "width": 31.25, "height": 22.5, "rotation": 0,
                   "rectanglelabels": ["class_1"]}}
ADDED = {"id": "Xq81Lm2a", "type": "rectanglelabels", "from_name": "label", "to_name": "image",
         "original_width": 96, "original_height": 80, "image_rotation": 0, "origin": "manual",
         "value": {"x": 75.0, "y": 62.5, "width": 18.75, "height": 31.25, "rotation": 0,
                   "rectanglelabels": ["class_0"]}}
# What the corrected json must hold for those annotations (every other record unchanged).
EXPECTED = {
    5000: {"id": 5000, "image_id": 1000, "category_id": 7, "bbox": [24, 6, 30, 18], "area": 540, "iscrowd": 0},
    5003: {"id": 5003, "image_id": 1000, "category_id": 7, "bbox": [65, 41, 16, 17], "area": 272, "iscrowd": 0},
    5049: {"id": 5049, "image_id": 1000, "category_id": 3, "bbox": [72, 50, 18, 25], "area": 450, "iscrowd": 0},
}
DELETED = 5006


def test_label_studio_round_trip(label_studio, finished_run, tmp_path):
    from label_studio_sdk import LabelStudio

    url, token = label_studio
    run_dir, ann, images = finished_run
    assert main(["export", str(run_dir), "--to", "labelstudio", "--top", "8", "--out",
                 str(tmp_path / "tasks.json"), "--annotations", str(ann), "--images", str(images)]) == 0
    ls = LabelStudio(base_url=url, api_key=token)
    project = ls.projects.create(title="kfold-ray suspects",
                                 label_config=(tmp_path / "tasks.xml").read_text())
    imported = ls.projects.import_tasks(id=project.id, request=json.loads((tmp_path / "tasks.json").read_text()))
    assert imported.task_count == 8 and imported.annotation_count == 8
    tasks = {t.data["kfold_ray_image_id"]: t for t in ls.tasks.list(project=project.id)}
    assert len(tasks) == 8
    annotation = ls.annotations.list(id=tasks[1000].id)[0]
    regions = {r["id"]: r for r in annotation.result}
    assert sorted(regions) == ["ann5000", "ann5003", "ann5006"]  # Label Studio kept our region ids
    assert regions["ann5000"]["value"]["x"] == pytest.approx(20 / 96 * 100)
    relabelled = copy.deepcopy(regions["ann5003"])
    relabelled["value"]["rectanglelabels"] = ["class_1"]
    ls.annotations.update(id=annotation.id, result=[MOVED, relabelled, ADDED])

    exported = b"".join(ls.projects.exports.download_sync(project.id, export_type="JSON",
                                                          download_all_tasks=True))
    (tmp_path / "export.json").write_bytes(exported)
    proc = subprocess.run([sys.executable, "-m", "kfold_ray._cli", "apply", "--annotations", str(ann),
                           "--fixes", str(tmp_path / "export.json"), "--out", str(tmp_path / "new.json")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == "8 reviewed images: 1 added, 1 deleted, 1 moved, 1 reclassified"

    original = json.loads(ann.read_text())
    new = json.loads((tmp_path / "new.json").read_text())
    by_id = {a["id"]: a for a in new["annotations"]}
    assert DELETED not in by_id
    for ann_id, want in EXPECTED.items():
        got = by_id[ann_id]
        assert {k: v for k, v in got.items() if k != "bbox"} == {k: v for k, v in want.items() if k != "bbox"}
        assert got["bbox"] == pytest.approx(want["bbox"], abs=0.5)
    untouched = [a for a in original["annotations"] if a["id"] not in (5000, 5003, DELETED)]
    assert [a for a in new["annotations"] if a["id"] not in EXPECTED] == untouched
    assert {k: v for k, v in new.items() if k != "annotations"} == {
        k: v for k, v in original.items() if k != "annotations"}
