"""A run dir written by an earlier kfold-ray (tests/fixtures/finished_run/, made by
tests/fixtures/make_finished_run.py) still reopens, reports and resumes with today's code.

Users keep run dirs for weeks: moving modules, renaming files or changing what goes into the
resume fingerprint must not strand them. The fixture's config.json records the absolute paths
of the machine it was made on, so the dataset is handed in here.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from kfold_ray import run_cv
from kfold_ray.data._dataset import load_coco
from kfold_ray.report._finished_run import read_finished_run
from kfold_ray.report._rank import label_issues_for_run
from kfold_ray.report._page import write_report

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "finished_run"


@pytest.fixture
def copy(tmp_path):
    """A private copy of the fixture (the tests write into the run dir)."""
    shutil.copytree(FIXTURE, tmp_path / "finished_run")
    root = tmp_path / "finished_run"
    return root / "run", root / "data" / "annotations.json", root / "data" / "images"


def _config(run_dir: Path) -> dict:
    return json.loads((run_dir / "config.json").read_text())["config"]


def test_the_fixture_opens_as_a_cvresult(copy):
    """`kfold_ray.open_run` on a run dir written by an earlier version, its dataset moved (the
    fixture's config.json names the paths of the machine that made it)."""
    from kfold_ray import open_run

    run_dir, ann, images = copy
    result = open_run(run_dir, annotations=ann, image_root=images)
    assert result.run_dir == run_dir
    assert result.fold_of_image.tolist() == json.loads((run_dir / "folds.json").read_text())["folds"]
    assert result.metrics == json.loads((run_dir / "metrics.json").read_text())
    assert len(result.predictions) == result.dataset.num_images == 8
    issues = result.label_issues(top=3)
    assert len(issues) == 3 and issues["image_path"].tolist() == [
        str(images / name) for name in issues["file_name"]]


def test_open_run_refuses_another_dataset_and_an_unfinished_run(copy):
    from kfold_ray import ConfigError, DatasetError, open_run

    run_dir, ann, images = copy
    doc = json.loads(ann.read_text())
    doc["annotations"][0]["category_id"] = 3
    changed = ann.with_name("changed.json")
    changed.write_text(json.dumps(doc))
    with pytest.raises(DatasetError, match=r"changed.json: not the dataset of run .*fingerprint"):
        open_run(run_dir, annotations=changed, image_root=images)
    state = json.loads((run_dir / "run.json").read_text())
    (run_dir / "run.json").write_text(json.dumps({**state, "status": "running"}))
    with pytest.raises(ConfigError, match="the run is not finished"):
        open_run(run_dir, annotations=ann, image_root=images)
    with pytest.raises(ConfigError, match="not a kfold-ray run dir"):
        open_run(images, annotations=ann, image_root=images)


def test_the_fixture_reopens_and_reports(copy):
    run_dir, ann, images = copy
    run = read_finished_run(run_dir, dataset=load_coco(ann, images))
    folds = json.loads((run_dir / "folds.json").read_text())
    assert run.fold_of_image.tolist() == folds["folds"]
    table = label_issues_for_run(run)
    assert sorted(table.column("image_id").to_pylist()) == sorted(run.dataset.image_ids.tolist())
    assert (run_dir / "label_issues.parquet").is_file()
    page = write_report(run, {"out_of_fold": table}, top=3)
    assert page.is_file() and "<html" in page.read_text(encoding="utf-8").lower()


@pytest.mark.parametrize("form", ["flat", "dict"])
def test_the_fixture_resumes_without_training_again(copy, form):
    """The overrides as the run recorded them (a flat KEY VALUE list), or as a dict: the same
    fingerprint, so the old run dir resumes either way."""
    run_dir, ann, images = copy
    before = pq.read_table(run_dir / "predictions.parquet")
    logs = {p: p.read_bytes() for p in (run_dir / "folds").rglob("log.txt")}
    c = _config(run_dir)
    flat = c["train"]["overrides"]
    overrides = flat if form == "flat" else dict(zip(flat[::2], flat[1::2]))
    import ray

    try:
        result = run_cv(ann, c["k"], image_root=images, model=c["train"]["model"],
                        overrides=overrides, gpus_per_fold=c["gpus_per_fold"],
                        run_dir=run_dir, score_threshold=c["predict"]["score_threshold"],
                        batch_size=c["predict"]["batch_size"], resume=True, progress=False,
                        address="local")
    finally:
        ray.shutdown()
    assert result.metrics["folds_run"] == {}  # every fold was finished: none ran again
    assert not list((run_dir / "folds").rglob("*.pth")), "a finished fold trained again"
    assert {p: p.read_bytes() for p in (run_dir / "folds").rglob("log.txt")} == logs
    after = pq.read_table(run_dir / "predictions.parquet")
    assert after.equals(before)
    assert np.array_equal(result.fold_of_image, json.loads((run_dir / "folds.json").read_text())["folds"])
