"""Exports of a finished run for review: COCO (checked with pycocotools), Label Studio tasks (their
percent rectangles against the json's own pixels), and the CLI's one-line errors.

The FiftyOne export is loaded by FiftyOne itself in test_fiftyone.py; Label Studio imports the
tasks in test_labelstudio_roundtrip.py.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import pyarrow.parquet as pq
import pytest

from kfold_ray import ConfigError, DatasetError, open_run
from kfold_ray._api import export_for_review
from kfold_ray._cli import main
from kfold_ray.report._box_issues import BOX_KINDS


def _export(finished_run, tmp_path, to, name, **kw):
    run_dir, ann, images = finished_run
    return export_for_review(run_dir, to=to, out=tmp_path / name, annotations=ann,
                             image_root=images, **kw)


def test_coco_export_is_the_datasets_own_records_for_pycocotools(finished_run, tmp_path):
    from pycocotools.coco import COCO

    _, ann, _ = finished_run
    done = _export(finished_run, tmp_path, "coco", "suspects.json", top=3)
    assert done.suspects == 3 and done.files == (str(tmp_path / "suspects.json"),)
    original = json.loads(ann.read_text())
    subset = json.loads((tmp_path / "suspects.json").read_text())
    ranked = [s["image_id"] for s in subset["kfold_ray"]["suspects"]]
    assert [s["rank"] for s in subset["kfold_ray"]["suspects"]] == [1, 2, 3]
    assert [im["id"] for im in subset["images"]] == ranked
    by_id = {im["id"]: im for im in original["images"]}
    assert subset["images"] == [by_id[i] for i in ranked]  # every field, video_id too
    assert subset["annotations"] == [a for i in ranked for a in original["annotations"]
                                     if a["image_id"] == i]
    assert subset["categories"] == original["categories"] and subset["info"] == original["info"]
    coco = COCO(str(tmp_path / "suspects.json"))
    assert sorted(coco.getImgIds()) == sorted(ranked)
    assert sorted(coco.getAnnIds(imgIds=ranked)) == sorted(a["id"] for a in subset["annotations"])


def test_labelstudio_tasks_carry_ids_percent_boxes_and_predictions(finished_run, tmp_path):
    run_dir, ann, _ = finished_run
    done = _export(finished_run, tmp_path, "labelstudio", "tasks.json", top=8, min_score=0.0)
    tasks = json.loads((tmp_path / "tasks.json").read_text())
    assert done.files == (str(tmp_path / "tasks.json"), str(tmp_path / "tasks.xml"))
    original = json.loads(ann.read_text())
    images = {im["id"]: im for im in original["images"]}
    names = {c["id"]: c["name"] for c in original["categories"]}
    assert sorted(t["data"]["kfold_ray_image_id"] for t in tasks) == sorted(images)
    assert [t["data"]["rank"] for t in tasks] == list(range(1, 9))
    predictions = pq.read_table(run_dir / "predictions.parquet").to_pylist()
    for t in tasks:
        im = images[t["data"]["kfold_ray_image_id"]]
        given = [a for a in original["annotations"] if a["image_id"] == im["id"] and not a["iscrowd"]]
        assert t["data"]["kfold_ray_annotation_ids"] == [a["id"] for a in given]
        regions = t["annotations"][0]["result"]
        assert [r["id"] for r in regions] == [f"ann{a['id']}" for a in given]
        for r, a in zip(regions, given):
            v = r["value"]
            x, y, w, h = a["bbox"]
            assert (r["original_width"], r["original_height"]) == (im["width"], im["height"])
            assert v["x"] * im["width"] / 100 == pytest.approx(x, abs=1e-6)
            assert v["y"] * im["height"] / 100 == pytest.approx(y, abs=1e-6)
            assert v["width"] * im["width"] / 100 == pytest.approx(w, abs=1e-6)
            assert v["height"] * im["height"] / 100 == pytest.approx(h, abs=1e-6)
            assert v["rectanglelabels"] == [names[a["category_id"]]] and v["rotation"] == 0
            assert r["meta"]["text"][0].split(" ")[0].rstrip("?,") in BOX_KINDS  # every box has one
        mine = [p for p in predictions if p["image_id"] == im["id"]]
        result = t.get("predictions", [{"result": []}])[0]["result"]
        assert len(result) == len(mine)
        assert sorted(r["score"] for r in result) == pytest.approx(sorted(p["score"] for p in mine), abs=1e-6)
    odd = next(t for t in tasks if t["data"]["file_name"] == "sub dir/bild_ä_ø.png")
    assert odd["data"]["image"] == "/data/local-files/?d=sub%20dir/bild_%C3%A4_%C3%B8.png"
    config = ET.fromstring((tmp_path / "tasks.xml").read_text())
    assert [label.get("value") for label in config.iter("Label")] == ["class_0", "class_1"]
    assert config.find("Image").get("value") == "$image"


def test_every_given_box_carries_the_per_box_rankings_verdict(finished_run, tmp_path):
    """The FiftyOne samples and the Label Studio regions say of each given box what
    box_issues.parquet says: its kind, score and whether it is named; a swap names its class."""
    run_dir, ann, images = finished_run
    _export(finished_run, tmp_path, "fiftyone", "fo", top=6)
    _export(finished_run, tmp_path, "labelstudio", "tasks.json", top=6)
    boxes = open_run(run_dir, annotations=ann, image_root=images).box_issues()
    verdict = {int(r["annotation_id"]): r for r in boxes.to_dict("records") if r["source"] == "given"}
    labels = [c["name"] for c in json.loads(ann.read_text())["categories"]]
    samples = json.loads((tmp_path / "fo" / "samples.json").read_text())["samples"]
    seen = 0
    for sample in samples:
        for d in sample["ground_truth"]["detections"]:
            v = verdict[d["coco_id"]]
            assert (d["kind"], d["named"]) == (v["kind"], v["named"])
            assert d["box_score"] == pytest.approx(v["score"])
            suggested = v["suggested_class_index"]
            swapped_to = labels[suggested] if v["kind"] == "swapped" and suggested >= 0 else None
            assert d.get("suggested_class") == swapped_to
            seen += 1
    assert seen >= 6
    for task in json.loads((tmp_path / "tasks.json").read_text()):
        for r in task["annotations"][0]["result"]:
            v = verdict[int(r["id"].removeprefix("ann"))]
            assert r["meta"]["text"][0].startswith(v["kind"] + (" (named" if v["named"] else "?"))


def test_labelstudio_min_score_and_image_url(finished_run, tmp_path):
    _export(finished_run, tmp_path, "labelstudio", "tasks.json", top=2, min_score=0.9,
            image_url="http://imgs.example/")
    tasks = json.loads((tmp_path / "tasks.json").read_text())
    assert all(r["score"] >= 0.9 for t in tasks for p in t.get("predictions", []) for r in p["result"])
    assert all(t["data"]["image"].startswith("http://imgs.example/") for t in tasks)


def test_export_refuses_a_changed_dataset_and_bad_options(finished_run, tmp_path, capsys):
    run_dir, ann, images = finished_run
    with pytest.raises(ConfigError, match="--to must be one of fiftyone, labelstudio, coco"):
        _export(finished_run, tmp_path, "cvat", "x.json")
    with pytest.raises(ConfigError, match="top must be an integer >= 1"):
        _export(finished_run, tmp_path, "coco", "x.json", top=0)
    with pytest.raises(ConfigError, match="--image-url is for --to labelstudio only"):
        _export(finished_run, tmp_path, "coco", "x.json", image_url="http://x/")
    doc = json.loads(ann.read_text())
    doc["annotations"][0]["bbox"] = [21, 2, 32, 20]
    ann.write_text(json.dumps(doc))
    with pytest.raises(DatasetError, match="not the dataset of run"):
        _export(finished_run, tmp_path, "coco", "x.json")
    code = main(["export", str(run_dir), "--to", "coco", "--out", str(tmp_path / "y.json"),
                 "--annotations", str(ann), "--images", str(images)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "not the dataset of run" in err, err
    assert not (tmp_path / "x.json").exists() and not (tmp_path / "y.json").exists()


def test_cli_export_prints_what_it_wrote(finished_run, tmp_path, capsys):
    run_dir, ann, images = finished_run
    code = main(["export", str(run_dir), "--to", "fiftyone", "--top", "4", "--out", str(tmp_path / "fo"),
                 "--annotations", str(ann), "--images", str(images)])
    out = capsys.readouterr().out
    assert code == 0 and out.splitlines() == ["exported the 4 worst images for fiftyone:",
                                              f"  {tmp_path / 'fo'}"]
    samples = json.loads((tmp_path / "fo" / "samples.json").read_text())["samples"]
    assert [s["rank"] for s in samples] == [1, 2, 3, 4]
