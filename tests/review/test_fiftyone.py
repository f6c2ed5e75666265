"""FiftyOne itself (a real database, tests/review/conftest.py) loads our exports: the FiftyOne
folder with its fields, and the COCO subset (what CVAT imports, checked here as FiftyOne reads
it: CVAT needs Docker). A review done in FiftyOne comes back through its own COCO export."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from kfold_ray._api import apply_fixes, export_for_review


def test_fiftyone_loads_the_export_with_its_fields(fiftyone, finished_run, tmp_path):
    fo = fiftyone
    run_dir, ann, images = finished_run
    export_for_review(run_dir, to="fiftyone", out=tmp_path / "fo", top=8, annotations=ann,
                      image_root=images)
    ds = fo.Dataset.from_dir(str(tmp_path / "fo"), dataset_type=fo.types.FiftyOneDataset,
                             name="kfold-ray-fields")
    original = json.loads(ann.read_text())
    by_id = {im["id"]: im for im in original["images"]}
    names = {c["id"]: c["name"] for c in original["categories"]}
    assert len(ds) == 8 and ds.default_classes == ["class_0", "class_1"]
    schema = ds.get_field_schema()
    for field in ("ground_truth", "predictions", "rank", "combined_score", "quality_score",
                  "issue_kind", "fold", "coco_id"):
        assert field in schema, field
    folds = dict(zip(json.loads((run_dir / "folds.json").read_text())["image_ids"],
                     json.loads((run_dir / "folds.json").read_text())["folds"]))
    predictions = pq.read_table(run_dir / "predictions.parquet").to_pylist()
    ranks = []
    for sample in ds.sort_by("rank"):
        im = by_id[sample.coco_id]
        ranks.append(sample.rank)
        assert sample.filepath == str(images / im["file_name"])
        assert (sample.metadata.width, sample.metadata.height) == (im["width"], im["height"])
        assert sample.fold == folds[im["id"]]
        given = [a for a in original["annotations"] if a["image_id"] == im["id"] and not a["iscrowd"]]
        dets = sample.ground_truth.detections
        assert [d.coco_id for d in dets] == [a["id"] for a in given]
        for d, a in zip(dets, given):
            x, y, w, h = a["bbox"]
            assert d.bounding_box == pytest.approx([x / im["width"], y / im["height"],
                                                    w / im["width"], h / im["height"]], abs=1e-6)
            assert d.label == names[a["category_id"]]
            assert d["loss_cls"] is not None and d["p_given"] is not None  # the fold model's losses
        mine = sorted(p["score"] for p in predictions if p["image_id"] == im["id"])
        assert sorted(d.confidence for d in sample.predictions.detections) == pytest.approx(mine, abs=1e-6)
    assert ranks == list(range(1, 9))


def test_fiftyone_reads_the_coco_subset(fiftyone, finished_run, tmp_path):
    fo = fiftyone
    run_dir, ann, images = finished_run
    export_for_review(run_dir, to="coco", out=tmp_path / "suspects.json", top=8, annotations=ann,
                      image_root=images)
    ds = fo.Dataset.from_dir(dataset_type=fo.types.COCODetectionDataset, data_path=str(images),
                             labels_path=str(tmp_path / "suspects.json"), include_id=True,
                             name="kfold-ray-coco", label_types=["detections"])
    original = json.loads(ann.read_text())
    assert len(ds) == 8
    boxes = {s.filepath.rsplit("/", 1)[-1]: len(s.detections.detections) if s.detections else 0
             for s in ds}
    expected = {im["file_name"].rsplit("/", 1)[-1]: sum(a["image_id"] == im["id"] for a in original["annotations"])
                for im in original["images"]}
    assert boxes == expected


def test_a_review_in_fiftyone_comes_back_through_its_coco_export(fiftyone, finished_run, tmp_path):
    """Edit ``ground_truth`` as a reviewer would (or as FiftyOne's annotate() loads it back),
    export it with FiftyOne's COCO exporter, apply: exactly the four changes."""
    fo = fiftyone
    run_dir, ann, images = finished_run
    export_for_review(run_dir, to="fiftyone", out=tmp_path / "fo", top=8, annotations=ann,
                      image_root=images)
    ds = fo.Dataset.from_dir(str(tmp_path / "fo"), dataset_type=fo.types.FiftyOneDataset,
                             name="kfold-ray-review")
    sample = ds.match(fo.ViewField("coco_id") == 1000).first()  # image 1000: 96 x 80
    dets = {d.coco_id: d for d in sample.ground_truth.detections}
    dets[5000].bounding_box = [0.25, 0.075, 0.3125, 0.225]  # [24, 6, 30, 18] px
    dets[5003].label = "class_1"
    kept = [d for d in sample.ground_truth.detections if d.coco_id != 5006]
    kept.append(fo.Detection(label="class_0", bounding_box=[0.75, 0.625, 0.1875, 0.3125]))  # [72, 50, 18, 25]
    sample.ground_truth = fo.Detections(detections=kept)
    sample.save()
    ds.export(export_dir=str(tmp_path / "coco"), dataset_type=fo.types.COCODetectionDataset,
              label_field="ground_truth", export_media=False)
    done = apply_fixes(ann, tmp_path / "coco", out=tmp_path / "new.json")
    original = json.loads(ann.read_text())
    new = json.loads((tmp_path / "new.json").read_text())
    assert done.reviewed_images == 8
    assert sorted((c["annotation_id"], c["change"]) for c in done.changes) == [
        (5000, "moved"), (5003, "reclassified"), (5006, "deleted"), (5049, "added")]
    by_id = {a["id"]: a for a in new["annotations"]}
    assert by_id[5000]["bbox"] == pytest.approx([24, 6, 30, 18], abs=0.5)
    assert by_id[5003]["category_id"] == 7 and 5006 not in by_id
    assert by_id[5049]["image_id"] == 1000 and by_id[5049]["category_id"] == 3
    assert by_id[5049]["bbox"] == pytest.approx([72, 50, 18, 25], abs=0.5)
    untouched = [a for a in original["annotations"] if a["id"] not in (5000, 5003, 5006)]
    assert [a for a in new["annotations"] if a["id"] not in (5000, 5003, 5049)] == untouched
