"""The label-issue report: ranking (cleanlab, once over the whole run), files, CLI, and the page in
a real headless browser.

The run dir is made without training: `TruthEchoBackend` "predicts" the TRUE boxes of each
held-out image (score 0.99) while the run is given labels with three injected errors (a swapped
class, a dropped box, a shifted box). Those three images must rank first, each with its kind.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from cocofactory import edit_coco, make_coco, read_coco
from fakes import EchoBackend, TruthEchoBackend  # noqa: F401  (Ray workers import it from fakes)

from kfold_ray import run_cv
from kfold_ray._cli import main
from kfold_ray.data._dataset import load_coco
from kfold_ray.report._objectlab import auxiliary_inputs
from kfold_ray.report._finished_run import read_finished_run
from kfold_ray.report._page import THUMB_MAX_BYTES, THUMB_SIDE
from kfold_ray.report._rank import LABEL_ISSUE_COLUMNS, rank_label_issues
from kfold_ray._schema import DETECTION_SCHEMA, make_prediction_batch

CATEGORIES = ["<b>cat</b>", "dog & co", 'say "hi"']  # HTML must escape them


# ---- the corrupted dataset and its run -----------------------------------------------------------
def _apart(boxes: list[list[float]], j: int, box: list[float]) -> bool:
    """``box`` (xywh) overlaps none of ``boxes`` but the j-th."""
    x, y, w, h = box
    return all(x + w <= bx or bx + bw <= x or y + h <= by or by + bh <= y
               for i, (bx, by, bw, bh) in enumerate(boxes) if i != j)


def _corrupt(doc: dict) -> dict:
    """Inject a swap, a drop and a shift into images with isolated boxes; return what was done."""
    by_image: dict[int, list[dict]] = {}
    for a in doc["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    sizes = {im["id"]: (im["width"], im["height"]) for im in doc["images"]}
    cat_ids = [c["id"] for c in doc["categories"]]
    done: dict = {}
    for image in doc["images"]:
        anns = [a for a in by_image.get(image["id"], []) if not a["iscrowd"]]
        if not anns or len(anns) != len(by_image[image["id"]]):
            continue
        boxes = [a["bbox"] for a in anns]
        a = anns[0]
        if not _apart(boxes, 0, a["bbox"]):
            continue
        if "swapped" not in done:
            original = a["category_id"]
            a["category_id"] = next(c for c in cat_ids if c != original)
            done["swapped"] = {"image_id": image["id"], "annotation_id": a["id"], "category_id": original}
        elif "overlooked" not in done and len(anns) == 1:  # leaves an image with no annotations
            doc["annotations"].remove(a)
            done["overlooked"] = {"image_id": image["id"], "bbox": a["bbox"]}
        elif "badly_located" not in done:
            x, y, w, h = a["bbox"]
            W, H = sizes[image["id"]]
            dx = round(0.4 * w) if x + w + round(0.4 * w) <= W else -round(0.4 * w)
            dy = round(0.4 * h) if y + h + round(0.4 * h) <= H else -round(0.4 * h)
            moved = [x + dx, y + dy, w, h]
            if not _apart(boxes, 0, moved):
                continue
            a["bbox"] = moved
            done["badly_located"] = {"image_id": image["id"], "annotation_id": a["id"], "bbox": [x, y, w, h]}
    assert set(done) == {"swapped", "overlooked", "badly_located"}, done
    return done


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished run (out-of-fold + in-sample) on labels with three known errors."""
    import ray

    root = tmp_path_factory.mktemp("report")
    truth, images = make_coco(root / "data", n_images=18, awkward=True, categories=CATEGORIES,
                              size=(96, 80), seed=3)
    ann = root / "data" / "given.json"
    shutil.copy(truth, ann)
    injected = {}
    edit_coco(ann, lambda d: injected.update(_corrupt(d)))
    backend = TruthEchoBackend(truth_annotations=str(truth), truth_images=str(images))
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             configure_logging=False)  # never join another process's cluster
    try:
        result = run_cv(ann, 3, image_root=images, gpus_per_fold=0, run_dir=root / "run",
                        backend=backend, progress=False, batch_size=4, in_sample=True)
    finally:
        ray.shutdown()
    return result, injected


def _ranking(result, **kwargs) -> pa.Table:
    """``result.label_issues()`` (a DataFrame) as an Arrow table, for the checks below."""
    return pa.Table.from_pandas(result.label_issues(**kwargs), preserve_index=False)


def test_injected_errors_rank_first_with_their_kind(finished):
    result, injected = finished
    frame = result.label_issues()
    assert isinstance(frame, pd.DataFrame)
    assert list(frame.columns) == [*LABEL_ISSUE_COLUMNS[:4], "image_path", *LABEL_ISSUE_COLUMNS[4:]]
    assert frame["image_path"].tolist() == [str(Path(result.dataset.image_root) / n)
                                            for n in frame["file_name"]]
    table = pa.Table.from_pandas(frame, preserve_index=False)
    assert table.num_rows == result.dataset.num_images
    assert table.column("rank").to_pylist() == list(range(1, table.num_rows + 1))
    q = table.column("quality_score").to_numpy()
    assert np.all(np.diff(q) >= 0), "worst first"
    top3 = {r["image_id"]: r for r in table.slice(0, 3).to_pylist()}
    assert {v["image_id"] for v in injected.values()} == set(top3)
    for kind, what in injected.items():
        row = top3[what["image_id"]]
        assert row["issue_kind"] == kind, (kind, row)
        boxes = json.loads(row["boxes"])
        assert boxes and boxes[0]["kind"] == kind
        if kind == "overlooked":
            x, y, w, h = what["bbox"]
            assert boxes[0]["source"] == "predicted"
            assert np.allclose(boxes[0]["bbox"], [x, y, x + w, y + h])
        else:
            assert boxes[0]["annotation_id"] == what["annotation_id"]
        if kind == "swapped":
            cat_index = [c.id for c in result.dataset.categories].index(what["category_id"])
            assert boxes[0]["predicted"]["class_index"] == cat_index
        if kind == "badly_located":
            x, y, w, h = what["bbox"]
            assert np.allclose(boxes[0]["predicted"]["bbox"], [x, y, x + w, y + h])
    assert top3[injected["swapped"]["image_id"]]["is_issue"]
    assert top3[injected["overlooked"]["image_id"]]["is_issue"]
    # Everything else is clean: no image beyond the third is flagged or named.
    rest = table.slice(3)
    assert not any(rest.column("is_issue").to_pylist())
    assert not any(rest.column("named").to_pylist())  # a kind, but no evidence of it
    assert all(top3[i]["named"] for i in top3)
    assert q[2] < q[3]  # strictly: the three errors come before every clean image


def test_images_without_annotations_are_ranked(finished):
    result, injected = finished
    table = _ranking(result)
    empty = table.filter(pc.equal(table.column("num_given"), 0))
    ids = set(empty.column("image_id").to_pylist())
    assert injected["overlooked"]["image_id"] in ids
    assert len(ids) >= 2  # the awkward dataset's box-less image too
    assert np.all(np.isfinite(empty.column("quality_score").to_numpy()))


def test_label_issue_files_and_fold_ids(finished):
    result, _ = finished
    frame = result.label_issues(top=4)
    assert len(frame) == 4
    on_disk = pq.read_table(result.run_dir / "label_issues.parquet")
    assert on_disk.num_rows == result.dataset.num_images
    assert on_disk.slice(0, 4).to_pandas().equals(frame)
    csv = (result.run_dir / "label_issues.csv").read_text(encoding="utf-8").splitlines()
    assert csv[0].replace('"', "").split(",") == [*LABEL_ISSUE_COLUMNS[:4], "image_path",
                                                   *LABEL_ISSUE_COLUMNS[4:]]
    assert len(csv) == result.dataset.num_images + 1
    folds = on_disk.sort_by("image_index").column("fold").to_numpy()
    assert np.array_equal(folds, result.fold_of_image)
    assert not list(result.run_dir.glob(".*.tmp"))
    in_sample = result.label_issues(in_sample=True)
    assert (result.run_dir / "in_sample" / "label_issues.parquet").is_file()
    assert set(in_sample["fold"]) == {0}


@pytest.mark.filterwarnings("ignore:.*has no \\(non-crowd\\) annotations:UserWarning")
def test_ranking_of_a_table_with_no_detections(tmp_path):
    ann, images = make_coco(tmp_path, n_images=5, awkward=True, categories=4)
    ds = load_coco(ann, images)
    table = rank_label_issues(ds, DETECTION_SCHEMA.empty_table())
    assert table.num_rows == 5
    assert np.all(table.column("quality_score").to_numpy() == 1.0)
    assert not any(table.column("is_issue").to_pylist())
    # The first image has no annotations; a confident box there is an overlooked object.
    first = ds.image_ids[0]
    edit_coco(ann, lambda d: d.update(annotations=[a for a in d["annotations"] if a["image_id"] != first]))
    ds = load_coco(ann, images)
    batch = make_prediction_batch(fold=0, image_indices=np.arange(5), det_image_index=np.array([0]),
                                  boxes=np.array([[10, 10, 40, 40]]), scores=np.array([0.99]),
                                  classes=np.array([1]), image_ids=ds.image_ids,
                                  category_ids=ds.category_ids)
    table = rank_label_issues(ds, pa.Table.from_batches([batch]))
    worst = table.slice(0, 1).to_pylist()[0]
    assert worst["image_index"] == 0 and worst["issue_kind"] == "overlooked"
    assert worst["num_given"] == 0 and worst["quality_score"] < 0.5


def test_auxiliary_inputs_match_cleanlab_and_rebuild_its_score():
    from cleanlab.internal.constants import TINY_VALUE
    from cleanlab.object_detection import rank as cl_rank

    rng = np.random.default_rng(0)
    labels, predictions = [], []
    for i in range(40):
        n = int(rng.integers(0, 4)) if i else 0
        xy = rng.uniform(0, 80, (n, 2))
        labels.append({"bboxes": np.c_[xy, xy + rng.uniform(4, 30, (n, 2))].astype(np.float32),
                       "labels": rng.integers(0, 3, n)})
        m = int(rng.integers(0, 6))
        xy = rng.uniform(0, 80, (m, 2))
        rows = np.c_[xy, xy + rng.uniform(4, 30, (m, 2)), rng.uniform(0.3, 1.0, m)].astype(np.float32)
        cls = rng.integers(0, 3, m)
        predictions.append([rows[cls == c] for c in range(3)])
    ours = auxiliary_inputs(labels, predictions)
    theirs = cl_rank._get_valid_inputs_for_compute_scores(0.9, labels, predictions)
    for a, b in zip(ours, theirs):
        for key in ("pred_labels", "pred_label_probs", "lab_labels"):
            assert np.allclose(np.asarray(a[key], float).ravel(), np.asarray(b[key], float).ravel()), key
        for key in ("iou_matrix", "similarity_matrix"):
            assert np.allclose(a[key], np.asarray(b[key]).reshape(a[key].shape), atol=1e-6), key
        assert a["min_possible_similarity"] == pytest.approx(b["min_possible_similarity"], abs=1e-7)
    pooled = [cl_rank.pool_box_scores_per_image(f(auxiliary_inputs=ours)) for f in (
        cl_rank.compute_overlooked_box_scores, cl_rank.compute_swap_box_scores,
        cl_rank.compute_badloc_box_scores)]
    rebuilt = np.exp(sum(np.log(TINY_VALUE + p) for p in pooled) / 3)
    expected = cl_rank.get_label_quality_scores(labels, predictions, verbose=False)
    assert np.allclose(rebuilt, expected, atol=1e-6)


# ---- CLI ----------------------------------------------------------------------------------------------
def test_cli_report_writes_ranking_and_page(finished, capsys):
    result, _ = finished
    assert main(["report", str(result.run_dir), "--top", "5"]) == 0
    out = capsys.readouterr().out
    assert "label_issues.csv" in out and "index.html" in out
    report = result.run_dir / "report"
    for name in ("index.html", "ap.png", "quality.png"):
        assert (report / name).stat().st_size > 0, name
    overlays = sorted(p.name for p in (report / "suspects").iterdir())
    assert overlays == [f"rank_{r:04d}.png" for r in range(1, 6)]
    for folder in (result.run_dir, result.run_dir / "in_sample"):
        assert (folder / "label_issues.parquet").is_file() and (folder / "label_issues.csv").is_file()
    page = (report / "index.html").read_text(encoding="utf-8")
    assert "&lt;b&gt;cat&lt;/b&gt;" in page or "dog &amp; co" in page
    assert "<b>cat</b>" not in page and "say \"hi\"" not in page
    assert "Out-of-fold vs in-sample" in page
    assert "Known label errors" not in page and 'class="card injected"' not in page  # no answer key
    assert "http://" not in page and "https://" not in page
    # A smaller --top removes the overlays it no longer shows.
    assert main(["report", str(result.run_dir), "--top", "2"]) == 0
    assert len(list((report / "suspects").iterdir())) == 2


def test_cli_report_refuses_what_is_not_a_finished_run(finished, tmp_path, capsys):
    result, _ = finished
    unfinished = tmp_path / "unfinished"
    shutil.copytree(result.run_dir, unfinished, ignore=shutil.ignore_patterns("report", "label_issues.*"))
    state = json.loads((unfinished / "run.json").read_text())
    (unfinished / "run.json").write_text(json.dumps({**state, "status": "running"}))
    for run_dir, says in ((unfinished, "not finished"), (tmp_path / "nothing", "no such run dir"),
                          (result.run_dir / "report", "not a kfold-ray run dir")):
        capsys.readouterr()
        assert main(["report", str(run_dir)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("kfold-ray: error:") and says in err and err.count("\n") == 1, err
    assert not (unfinished / "report").exists() and not (unfinished / "label_issues.csv").exists()


def test_cli_report_refuses_a_changed_dataset(finished, tmp_path, capsys):
    result, _ = finished
    moved = tmp_path / "run"
    shutil.copytree(result.run_dir, moved)
    ann = tmp_path / "given.json"
    doc = read_coco(result.dataset.annotations_path)
    doc["annotations"] = doc["annotations"][1:]
    ann.write_text(json.dumps(doc), encoding="utf-8")
    config = json.loads((moved / "config.json").read_text())
    (moved / "config.json").write_text(json.dumps({**config, "annotations": str(ann)}))
    assert main(["report", str(moved)]) == 2
    err = capsys.readouterr().err
    assert "dataset changed since the run" in err and err.count("\n") == 1


# ---- the page in a real browser ----------------------------------------------------------------------
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]


def _browser_missing() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install -e '.[test]')"
    if not Path(CHROMIUM).exists():
        return f"{CHROMIUM} is missing (apt-get install chromium; scripts/setup.sh does)"
    return None


def test_report_page_in_headless_chromium(finished, tmp_path):
    missing = _browser_missing()
    if missing:  # CI must have them (scripts/setup.sh installs both): there it is a failure
        (pytest.fail if os.environ.get("CI") else pytest.skip)(missing)
    from playwright import sync_api as playwright

    result, _ = finished
    top = 4
    assert main(["report", str(result.run_dir), "--top", str(top)]) == 0
    # The page alone, as it arrives by mail: every picture is in it.
    mailed = tmp_path / "mailed"
    mailed.mkdir()
    index = mailed / "index.html"
    shutil.copy(result.run_dir / "report" / "index.html", index)
    problems, requests = [], []
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}")
                    if m.type in ("error", "warning") else None)
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url}"))
            page.on("request", lambda r: requests.append(r.url))
            page.goto(index.as_uri(), wait_until="load")
            images = page.eval_on_selector_all(
                "img", "els => els.map(e => [e.getAttribute('src'), e.complete, e.naturalWidth])")
            shot = tmp_path / "report.png"
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert problems == []
    assert [url for url in requests if not url.startswith("data:")] == [index.as_uri()], requests
    assert len(images) == top + 2 and all(src.startswith("data:image/") for src, _, _ in images)
    assert all(complete and width > 0 for _, complete, width in images), images
    thumbs = [src for src, _, width in images[2:]]
    assert all(len(src) * 3 / 4 <= THUMB_MAX_BYTES + 4 for src in thumbs)
    assert all(width <= THUMB_SIDE for _, _, width in images[2:])
    assert shot.stat().st_size > 10_000


def test_overlays_mark_the_boxes_concerned_and_survive_an_unreadable_image(finished, tmp_path):
    from PIL import Image

    from kfold_ray.report._rank import label_issues_for_run
    from kfold_ray.report._overlays import CONCERNED
    from kfold_ray.report._page import write_report

    result, _ = finished
    data, run_dir = tmp_path / "data", tmp_path / "run"
    shutil.copytree(result.dataset.image_root, data)
    shutil.copytree(result.run_dir, run_dir, ignore=shutil.ignore_patterns("report"))
    config = json.loads((run_dir / "config.json").read_text())
    (run_dir / "config.json").write_text(json.dumps({**config, "image_root": str(data)}))
    run = read_finished_run(run_dir)
    ranking = label_issues_for_run(run, write=False)
    worst = ranking.slice(0, 1).to_pylist()[0]
    broken = data / worst["file_name"]
    broken.write_bytes(b"\0" * broken.stat().st_size)  # same size: the fingerprint still matches
    write_report(read_finished_run(run_dir), {"out_of_fold": ranking}, top=2)
    for rank in (1, 2):
        overlay = Image.open(run_dir / "report" / "suspects" / f"rank_{rank:04d}.png").convert("RGB")
        assert max(overlay.size) == 512
        assert (np.asarray(overlay) == CONCERNED).all(axis=2).sum() > 100  # red boxes drawn
    page = (run_dir / "report" / "index.html").read_text(encoding="utf-8")
    assert "Out-of-fold vs in-sample" not in page  # no in-sample ranking given


def test_loss_and_unmatched_signals_point_at_the_two_bad_images(tmp_path, caplog):
    from kfold_ray._schema import BOX_LOSS_SCHEMA

    ann, images = make_coco(tmp_path, n_images=6, categories=3, boxes_per_image=(1, 1), seed=2)
    ds = load_coco(ann, images)
    # A confident prediction far from image 4's given box (a missing label), and image 1's given
    # box scored badly by its fold model (a swapped class or shifted box).
    batch = make_prediction_batch(fold=0, image_indices=np.arange(6), det_image_index=np.array([4]),
                                  boxes=np.array([[0, 0, 5, 5]]), scores=np.array([0.9]),
                                  classes=np.array([0]), image_ids=ds.image_ids,
                                  category_ids=ds.category_ids)
    rows = np.arange(6)  # one given box per image: annotation row i belongs to image i
    # box_losses.parquet as kfold-ray wrote it before p_other / other_class / refined_iou
    losses = pa.table({"image_index": rows, "ann_row": rows,
                       "loss_cls": np.where(rows == 1, 5.0, 0.1).astype(np.float32),
                       "loss_box_reg": np.full(6, 0.2, np.float32), "p_given": np.full(6, 0.5, np.float32),
                       "p_background": np.full(6, 0.1, np.float32)})
    assert set(BOX_LOSS_SCHEMA.names) - set(losses.column_names) == {"p_other", "other_class", "refined_iou"}
    with caplog.at_level("WARNING", logger="kfold_ray.report"):
        table = rank_label_issues(ds, pa.Table.from_batches([batch]), box_losses=losses).to_pandas()
    notes = [r.getMessage() for r in caplog.records if r.name == "kfold_ray.report"]
    assert len(notes) == 1 and "no p_other, refined_iou" in notes[0]
    by_image = table.set_index("image_index")
    assert by_image.loc[1, "loss_score"] == pytest.approx(5.2)
    assert by_image.loc[4, "unmatched_score"] == pytest.approx(0.9) and by_image.loc[0, "unmatched_score"] == 0
    top_two = table.sort_values("combined_score", ascending=False).image_index.head(2)
    assert sorted(top_two) == [1, 4]
    assert table.combined_score.between(0, 1).all()
    without = rank_label_issues(ds, pa.Table.from_batches([batch])).to_pandas()
    assert without.loss_score.isna().all() and without.combined_score.isna().all()


def test_issue_kinds_come_from_the_per_box_signals(tmp_path):
    from kfold_ray._schema import BOX_LOSS_SCHEMA
    from kfold_ray.report._box_issues import BOX_ISSUE_COLUMNS
    from kfold_ray.report._rank import rank_issues

    n = 24
    ann, images = make_coco(tmp_path, n_images=n, categories=3, boxes_per_image=(1, 1), seed=2)
    ds = load_coco(ann, images)
    # The fold model predicts every given box with its class; more or less sure of it (p_given
    # 0.55 to 0.95), and where it would put the box overlaps it at IoU 0.9. Except: image 2 it
    # sees another class in (a swap), image 3's box it would move (IoU 0.3: shifted), image 4's
    # box holds background to it (spurious), and image 5 has a confident prediction on empty
    # ground besides (a missing label).
    rows = np.arange(n)
    det_image = np.r_[rows, 5]
    boxes = np.concatenate([ds.boxes, [[0, 0, 5, 5]]])
    batch = make_prediction_batch(
        fold=0, image_indices=rows, det_image_index=det_image, boxes=boxes,
        scores=np.full(n + 1, 0.9), classes=np.r_[ds.classes, 0], image_ids=ds.image_ids,
        category_ids=ds.category_ids)
    p_given = np.select([rows == 2, rows == 4], [0.05, 0.05], np.linspace(0.55, 0.95, n))
    p_other = np.select([rows == 2, rows == 4], [0.9, 0.05], 0.02)
    p_background = np.where(rows == 4, 0.9, 0.03)
    refined = np.where(rows == 3, 0.3, 0.9)
    losses = pa.table({"image_index": rows, "ann_row": rows,
                       "loss_cls": (-np.log(p_given)).astype(np.float32),
                       "loss_box_reg": np.where(rows == 3, 0.9, 0.1).astype(np.float32),
                       "p_given": p_given.astype(np.float32), "p_background": p_background.astype(np.float32),
                       "p_other": p_other.astype(np.float32), "other_class": ((ds.classes + 1) % 3).astype(np.int32),
                       "refined_iou": refined.astype(np.float32)}, schema=BOX_LOSS_SCHEMA)
    table, per_box = rank_issues(ds, pa.Table.from_batches([batch]), box_losses=losses)
    by = table.to_pandas().set_index("image_index")
    named = {2: "swapped", 3: "badly_located", 4: "spurious", 5: "overlooked"}
    assert {i: by.issue_kind[i] for i in named} == named
    assert by.named.to_dict() == {i: i in named for i in range(n)}  # the rest: a kind, no evidence
    assert set(by.issue_kind) <= set(named.values())
    assert sorted(table.column("image_index").to_pylist()[:4]) == [2, 3, 4, 5]
    # The per-box ranking: every given box and the one unmatched prediction, the four first.
    assert per_box.column_names == list(BOX_ISSUE_COLUMNS) and per_box.num_rows == n + 1
    top = per_box.slice(0, 4).to_pandas()
    assert dict(zip(top.image_index, top.kind)) == named and top.named.all()
    assert top.set_index("image_index").loc[5, "source"] == "predicted"
    assert per_box.column("named").to_pylist()[4:] == [False] * (n - 3)
    by_image = table.to_pandas().set_index("image_index")
    first = {i: json.loads(by_image.loc[i, "boxes"])[0] for i in named}
    assert first[5]["source"] == "predicted" and first[5]["bbox"] == [0, 0, 5, 5]
    for i in (2, 3, 4):
        assert first[i]["source"] == "given" and first[i]["kind"] == named[i]
        assert first[i]["annotation_id"] == int(ds.ann_ids[i])
        assert first[i]["predicted"]["bbox"] == pytest.approx(ds.boxes[i].tolist(), abs=0.01)
    assert first[2]["suggested"]["class_index"] == (ds.classes[2] + 1) % 3
    assert first[2]["p_other"] == pytest.approx(0.9) and first[3]["refined_iou"] == pytest.approx(0.3)


def test_page_and_cli_mark_the_injected_errors(finished, tmp_path, capsys):
    result, injected = finished
    old_data = Path(result.dataset.annotations_path).parent
    data, run_dir = tmp_path / "data", tmp_path / "run"
    shutil.copytree(old_data, data)
    shutil.copytree(result.run_dir, run_dir, ignore=shutil.ignore_patterns("report"))
    config = json.loads((run_dir / "config.json").read_text())
    image_root = data / Path(result.dataset.image_root).relative_to(old_data)
    (run_dir / "config.json").write_text(json.dumps(
        {**config, "annotations": str(data / "given.json"), "image_root": str(image_root)}))
    # The answer key, as the example writes it: the three injected errors, and one more image that
    # the ranking does not put first (a "missing" box nobody can see: nothing was removed).
    kinds = {"swapped": "swapped", "overlooked": "missing", "badly_located": "shifted"}
    records = [{"image_id": v["image_id"], "kind": kinds[k], "annotation_id": v.get("annotation_id")}
               for k, v in injected.items()]
    table = _ranking(result)
    last = table.slice(table.num_rows - 1).to_pylist()[0]
    records.append({"image_id": last["image_id"], "kind": "missing", "annotation_id": None})
    (data / "injected_errors.json").write_text(json.dumps(records))
    assert main(["report", str(run_dir), "--top", "6"]) == 0
    out = capsys.readouterr().out
    assert "the 4 injected errors, 3 of them in the top 4 (precision 0.75)" in out
    page = (run_dir / "report" / "index.html").read_text(encoding="utf-8")
    assert "Known label errors" in page and "3 of 4" in page
    assert page.count('class="card injected"') == 3  # the three in the top 6; the last is not shown
    assert page.count("injected error</span>: the class was swapped") == 1
    assert page.count("injected error</span>: a box was removed") == 1


def test_review_exports_carry_each_boxs_kind_and_the_class_a_swap_should_be(finished, tmp_path):
    """What the per-box ranking found reaches the tool a person fixes labels in: the injected
    swap's box says "swapped" and names its true class, the overlooked object is a predicted
    box marked "overlooked" (FiftyOne's samples, as `export_for_review` writes them)."""
    from kfold_ray import export_for_review

    result, injected = finished
    export_for_review(result.run_dir, to="fiftyone", out=tmp_path / "fo", top=3)
    samples = json.loads((tmp_path / "fo" / "samples.json").read_text())["samples"]
    by_image = {s["coco_id"]: s for s in samples}
    swap = injected["swapped"]
    given = {d["coco_id"]: d for d in by_image[swap["image_id"]]["ground_truth"]["detections"]}
    names = {c.id: c.name for c in result.dataset.categories}
    assert given[swap["annotation_id"]]["kind"] == "swapped"
    assert given[swap["annotation_id"]]["named"] is True
    assert given[swap["annotation_id"]]["suggested_class"] == names[swap["category_id"]]
    x, y, w, h = injected["overlooked"]["bbox"]
    image = by_image[injected["overlooked"]["image_id"]]
    W, H = image["metadata"]["width"], image["metadata"]["height"]
    marked = [d for d in image["predictions"]["detections"] if d.get("kind") == "overlooked"]
    assert any(np.allclose(d["bounding_box"], [x / W, y / H, w / W, h / H], atol=1e-3) for d in marked)
