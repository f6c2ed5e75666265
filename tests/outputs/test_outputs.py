"""Output files (cleanlab, COCO results, Parquet, categories) and COCO metrics of predictions."""

from __future__ import annotations

import io
import json
import pickle
import pickletools
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kfold_ray.outputs import _pickles, _writers
from kfold_ray.data._dataset import Category, CocoDataset
from kfold_ray.outputs._metrics import coco_metrics
from kfold_ray.outputs._writers import (
    cleanlab_predictions,
    write_all,
    write_cleanlab_labels,
    write_cleanlab_predictions,
    write_coco_results,
    write_predictions_parquet,
)
from kfold_ray.run._stitch import stitch
from kfold_ray._schema import DETECTION_SCHEMA, make_prediction_batch

K = 3


def _dataset(n_images: int = 18, n_classes: int = 4, seed: int = 0) -> CocoDataset:
    """Random boxes; image 0 has no annotation, image 1 has a crowd box, each fold has boxes."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, 5, n_images)
    counts[0] = 0
    m = int(counts.sum())
    xy = rng.uniform(0, 60, (m, 2))
    wh = rng.uniform(8, 40, (m, 2))
    iscrowd = np.zeros(m, dtype=bool)
    iscrowd[counts[0]] = True  # first box of image 1
    return CocoDataset(
        annotations_path=Path("synthetic.json"),
        image_root=Path("."),
        image_ids=np.arange(n_images, dtype=np.int64) * 3 + 100,
        file_names=tuple(f"{i}.png" for i in range(n_images)),
        widths=np.full(n_images, 120, dtype=np.int64),
        heights=np.full(n_images, 110, dtype=np.int64),
        categories=tuple(Category(id=cid, name=f"c{cid}") for cid in (2, 5, 7, 90, 91, 92)[:n_classes]),
        ann_offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        ann_ids=np.arange(m, dtype=np.int64) + 1000,
        boxes=np.concatenate([xy, xy + wh], axis=1).astype(np.float32),
        classes=rng.integers(0, n_classes, m).astype(np.int64),
        iscrowd=iscrowd,
    )


def _folds(ds: CocoDataset) -> np.ndarray:
    return (np.arange(ds.num_images) % K).astype(np.int64)


def _stitched(ds: CocoDataset, *, shift: float = 0.0, extra: int = 2, seed: int = 1) -> pa.Table:
    """Ground-truth boxes (score 1, moved by ``shift`` px) plus ``extra`` low-score boxes per image."""
    rng = np.random.default_rng(seed)
    fold_of_image = _folds(ds)
    keep = ~ds.iscrowd
    gt_image = np.repeat(np.arange(ds.num_images), np.diff(ds.ann_offsets))[keep]
    ex_image = np.repeat(np.arange(ds.num_images), extra)
    ex_xy = rng.uniform(0, 80, (ex_image.size, 2))
    det_image = np.concatenate([gt_image, ex_image])
    boxes = np.concatenate([ds.boxes[keep] + shift, np.concatenate([ex_xy, ex_xy + 5], axis=1)])
    scores = np.concatenate([np.ones(gt_image.size), rng.uniform(0.05, 0.3, ex_image.size)])
    classes = np.concatenate([ds.classes[keep], rng.integers(0, ds.num_classes, ex_image.size)])
    folds = {}
    for f in range(K):
        held = np.flatnonzero(fold_of_image == f)
        rows = np.isin(det_image, held)
        b = make_prediction_batch(
            fold=f, image_indices=held, det_image_index=det_image[rows], boxes=boxes[rows],
            scores=scores[rows], classes=classes[rows], image_ids=ds.image_ids,
            category_ids=ds.category_ids,
        )
        folds[f] = (pa.Table.from_batches([b]), held)
    return stitch(folds, fold_of_image, ds.num_images)


def _naive_predictions(table: pa.Table, n: int, c: int) -> list[list[np.ndarray]]:
    """The obvious per-row loop (like the seed notebook's), as the reference."""
    rows = table.to_pylist()
    out = [[[] for _ in range(c)] for _ in range(n)]
    for r in rows:
        out[r["image_index"]][r["class_index"]].append([r["x1"], r["y1"], r["x2"], r["y2"], r["score"]])
    return [[np.array(b, dtype=np.float32).reshape(-1, 5) for b in img] for img in out]


def _assert_same_predictions(got, expected) -> None:
    assert len(got) == len(expected)
    for g_img, e_img in zip(got, expected):
        assert isinstance(g_img, list) and len(g_img) == len(e_img)
        for g, e in zip(g_img, e_img):
            assert isinstance(g, np.ndarray) and g.dtype == np.float32 and g.shape == e.shape
            assert g.shape[1:] == (5,)
            np.testing.assert_array_equal(g, e)


# ---- cleanlab predictions ---------------------------------------------------------------------
def test_cleanlab_predictions_have_cleanlabs_exact_format():
    ds = _dataset()
    table = _stitched(ds)
    preds = cleanlab_predictions(table, num_images=ds.num_images, num_classes=ds.num_classes)
    _assert_same_predictions(preds, _naive_predictions(table, ds.num_images, ds.num_classes))
    empties = [a for img in preds for a in img if a.shape[0] == 0]
    assert empties and all(a is empties[0] for a in empties)  # one shared (0, 5) array
    assert empties[0].shape == (0, 5) and empties[0].dtype == np.float32
    for img in preds:  # score descending within a class
        for a in img:
            assert (np.diff(a[:, 4]) <= 0).all()


def test_cleanlab_predictions_pickle_loads_to_the_same_lists(tmp_path):
    ds = _dataset()
    table = _stitched(ds)
    path = write_cleanlab_predictions(tmp_path / "p.pkl", table, num_images=ds.num_images,
                                      num_classes=ds.num_classes)
    raw = path.read_bytes()
    pickletools.dis(raw, out=io.StringIO())  # a well-formed pickle stream
    expected = _naive_predictions(table, ds.num_images, ds.num_classes)
    _assert_same_predictions(pickle.loads(raw), expected)
    _assert_same_predictions(pickle._Unpickler(io.BytesIO(raw)).load(), expected)  # pure Python too


def test_cleanlab_predictions_of_no_detection_are_all_empty(tmp_path):
    path = write_cleanlab_predictions(tmp_path / "p.pkl", DETECTION_SCHEMA.empty_table(),
                                      num_images=3, num_classes=2)
    loaded = pickle.loads(path.read_bytes())
    assert len(loaded) == 3
    assert all(len(img) == 2 and all(a.shape == (0, 5) and a.dtype == np.float32 for a in img)
               for img in loaded)


def test_cleanlab_predictions_refuse_a_class_out_of_range():
    ds = _dataset()
    with pytest.raises(ValueError, match=r"class_index outside \[0, 2\)"):
        cleanlab_predictions(_stitched(ds), num_images=ds.num_images, num_classes=2)


def test_cleanlab_accepts_the_written_files(tmp_path):
    from cleanlab.object_detection.filter import find_label_issues
    from cleanlab.object_detection.rank import get_label_quality_scores

    ds = _dataset()  # image 0 has no annotation (cleanlab #1234)
    paths = write_all(tmp_path, _stitched(ds, shift=3.0), ds)
    labels = pickle.loads(paths.cleanlab_labels.read_bytes())
    preds = pickle.loads(paths.cleanlab_predictions.read_bytes())
    scores = get_label_quality_scores(labels, preds, verbose=False)
    assert scores.shape == (ds.num_images,) and np.isfinite(scores).all()
    # (return_indices_ranked_by_score=True calls np.in1d, gone in NumPy 2.4: cleanlab 2.9's bug.)
    issues = find_label_issues(labels, preds)
    assert issues.shape == (ds.num_images,) and issues.dtype == bool


def test_cleanlab_labels_pickle_equals_the_datasets_labels(tmp_path):
    ds = _dataset()  # image 0 without annotation, image 1 with a crowd box (left out)
    raw = write_cleanlab_labels(tmp_path / "l.pkl", ds).read_bytes()
    pickletools.dis(raw, out=io.StringIO())
    expected = ds.cleanlab_labels()
    for got in (pickle.loads(raw), pickle._Unpickler(io.BytesIO(raw)).load()):
        assert len(got) == len(expected)
        for g, e in zip(got, expected):
            assert set(g) == {"bboxes", "labels"}
            for key in ("bboxes", "labels"):
                assert g[key].dtype == e[key].dtype and g[key].shape == e[key].shape
                np.testing.assert_array_equal(g[key], e[key])
    assert got[0]["bboxes"].shape == (0, 4) and got[0]["labels"].shape == (0,)
    assert len(got[1]["labels"]) == np.diff(ds.ann_offsets)[1] - 1


def test_nested_slices_keep_any_row_shape_and_dtype():
    data = np.arange(12, dtype=np.int16).reshape(6, 2)
    buf = io.BytesIO()
    _pickles.dump_nested_slices(buf, data, np.array([2, 0, 0, 4]), 2, 2)
    got = pickle.loads(buf.getvalue())
    as_lists = [[a.tolist() for a in item] for item in got]
    assert as_lists == [[[[0, 1], [2, 3]], []], [[], data[2:].tolist()]]
    assert got[0][1].shape == (0, 2) and got[0][1].dtype == np.int16 and got[0][1] is got[1][0]


# ---- COCO results, parquet, categories ---------------------------------------------------------
def test_coco_results_load_in_pycocotools(tmp_path):
    from pycocotools.cocoeval import COCOeval

    ds = _dataset()
    table = _stitched(ds)
    path = write_coco_results(tmp_path / "r.json", table)
    results = json.loads(path.read_text())
    assert len(results) == table.num_rows
    first = results[0]
    assert set(first) == {"image_id", "category_id", "bbox", "score"}
    x1, y1, x2, y2 = (table.column(n).to_numpy().astype(np.float64) for n in ("x1", "y1", "x2", "y2"))
    half_up = lambda v, d: np.floor(np.abs(v) * 10**d + 0.5) / 10**d  # noqa: E731
    np.testing.assert_allclose([r["bbox"][0] for r in results], half_up(x1, 2), atol=1e-9)
    np.testing.assert_allclose([r["bbox"][3] for r in results], half_up(y2 - y1, 2), atol=1e-9)
    np.testing.assert_allclose([r["score"] for r in results],
                               half_up(table.column("score").to_numpy().astype(np.float64), 5))
    assert [r["category_id"] for r in results] == table.column("category_id").to_pylist()
    assert [r["image_id"] for r in results] == table.column("image_id").to_pylist()

    gt = _coco_gt(ds)
    evaluator = COCOeval(gt, gt.loadRes(str(path)), "bbox")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    assert evaluator.stats[0] == pytest.approx(1.0)


def test_coco_results_numbers_are_plain_json(tmp_path):
    values = [0.0, -0.0, -0.004, 0.005, 99.995, 1234567.5, -3.333, 10.0, 0.1]
    n = len(values)
    t = pa.table(
        {"image_index": np.arange(n), "image_id": np.arange(n) - 3, "fold": np.zeros(n, np.int32),
         "class_index": np.zeros(n, np.int32), "category_id": np.full(n, 12345678901),
         "x1": np.float32(values), "y1": np.zeros(n, np.float32), "x2": np.float32(values) + 1,
         "y2": np.ones(n, np.float32),
         "score": np.float32([1, 0, 0.123456, 0.5, 1e-6, 0.99999, 0.3, 0.05, 0.7])},
        schema=DETECTION_SCHEMA,
    )
    text = write_coco_results(tmp_path / "r.json", t).read_text()
    assert "-0.00" not in text and "nan" not in text
    widths = {len(line) for line in text.splitlines()[1:-1]}
    assert len(widths) <= 2  # fixed-width rows (the last one lacks its comma)
    got = json.loads(text)
    assert [r["bbox"][0] for r in got] == [0, 0, 0, 0, 100, 1234567.5, -3.33, 10, 0.1]
    assert [r["score"] for r in got] == [1, 0, 0.12346, 0.5, 0, 0.99999, 0.3, 0.05, 0.7]
    assert [r["image_id"] for r in got] == list(range(-3, n - 3))
    assert got[0]["category_id"] == 12345678901
    empty = write_coco_results(tmp_path / "e.json", DETECTION_SCHEMA.empty_table())
    assert json.loads(empty.read_text()) == []


def test_parquet_has_the_detection_columns(tmp_path):
    ds = _dataset()
    table = _stitched(ds)
    back = pq.read_table(write_predictions_parquet(tmp_path / "p.parquet", table))
    assert back.schema.equals(DETECTION_SCHEMA)
    assert back.equals(table)


def test_write_all_writes_every_file(tmp_path):
    ds = _dataset()
    paths = write_all(tmp_path / "run", _stitched(ds), ds)
    for p in (paths.predictions_parquet, paths.cleanlab_predictions, paths.cleanlab_labels,
              paths.coco_results, paths.categories):
        assert p.is_file() and p.parent == tmp_path / "run"
    assert json.loads(paths.categories.read_text()) == [
        {"class_index": i, "id": c.id, "name": c.name} for i, c in enumerate(ds.categories)
    ]
    labels = pickle.loads(paths.cleanlab_labels.read_bytes())
    assert len(labels) == ds.num_images and labels[0]["bboxes"].shape == (0, 4)
    assert not list((tmp_path / "run").glob("*.tmp")) and not list((tmp_path / "run").glob(".*"))


@pytest.mark.parametrize(
    "writer, target",
    [
        ("predictions_parquet", "pq.write_table"),
        ("cleanlab_predictions", "_nested_block"),
        ("coco_results", "_ResultLayout.render"),
    ],
)
def test_a_writer_that_fails_midway_leaves_no_file(tmp_path, monkeypatch, writer, target):
    ds = _dataset(n_images=9000, n_classes=2)  # several blocks: fail after some bytes are out
    table = _stitched(ds, extra=60)
    calls = []

    def fail_on_second(original):
        def wrapped(*args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                raise OSError("disk full")
            return original(*args, **kwargs)
        return wrapped

    if target == "pq.write_table":
        def partial_then_fail(tbl, where, **kwargs):
            Path(where).write_bytes(b"PAR1 half")
            raise OSError("disk full")
        monkeypatch.setattr(_writers.pq, "write_table", partial_then_fail)
    elif target == "_nested_block":
        monkeypatch.setattr(_pickles, "_nested_block", fail_on_second(_pickles._nested_block))
    else:
        render = fail_on_second(_writers._ResultLayout.render)
        monkeypatch.setattr(_writers._ResultLayout, "render", render)
    with pytest.raises(OSError, match="disk full"):
        write_all(tmp_path, table, ds)
    names = {
        "predictions_parquet": "predictions.parquet",
        "cleanlab_predictions": "cleanlab_predictions.pkl",
        "coco_results": "coco_results.json",
    }
    assert not (tmp_path / names[writer]).exists()
    assert not list(tmp_path.glob(".*.tmp"))
    if target != "pq.write_table":
        assert len(calls) == 2


# ---- metrics ----------------------------------------------------------------------------------
def _coco_gt(ds: CocoDataset):
    from kfold_ray.outputs._metrics import _ground_truth

    return _ground_truth(ds)


def test_perfect_predictions_score_ap_one_per_fold_and_pooled():
    ds = _dataset()
    m = coco_metrics(ds, _stitched(ds, extra=0), _folds(ds), K)
    assert set(m["folds"]) == {str(f) for f in range(K)}
    for stats in [m["pooled"], *m["folds"].values()]:
        for name in ("AP", "AP50", "AP75"):
            assert stats[name] == pytest.approx(1.0)
    assert m["pooled"]["num_images"] == ds.num_images
    assert sum(s["num_images"] for s in m["folds"].values()) == ds.num_images
    json.dumps(m)  # JSON-ready


def test_shifted_predictions_score_lower():
    ds = _dataset()
    perfect = coco_metrics(ds, _stitched(ds), _folds(ds), K)
    shifted = coco_metrics(ds, _stitched(ds, shift=6.0), _folds(ds), K)
    assert shifted["pooled"]["AP"] < perfect["pooled"]["AP"]
    assert shifted["pooled"]["AP75"] < perfect["pooled"]["AP75"]
    for f in map(str, range(K)):
        assert shifted["folds"][f]["AP"] < perfect["folds"][f]["AP"]


def test_per_fold_numbers_equal_a_cocoeval_restricted_to_the_fold():
    from pycocotools.cocoeval import COCOeval

    ds = _dataset(n_images=30)
    table = _stitched(ds, shift=2.5, extra=4)
    m = coco_metrics(ds, table, _folds(ds), K, evaluator="pycocotools")  # evaluate() once, reused
    gt = _coco_gt(ds)
    from kfold_ray.outputs._metrics import _results

    for f in range(K):
        ev = COCOeval(gt, _results(gt, table), "bbox")
        ev.params.imgIds = ds.image_ids[_folds(ds) == f].tolist()
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
        got = [m["folds"][str(f)][n] for n in ("AP", "AP50", "AP75", "APs", "APm", "APl")]
        np.testing.assert_allclose(got, ev.stats[:6])


def test_metrics_without_any_detection_are_zero_not_a_crash(capsys):
    ds = _dataset()
    m = coco_metrics(ds, DETECTION_SCHEMA.empty_table(), _folds(ds), K)
    assert m["pooled"]["AP"] == 0.0 and m["pooled"]["num_detections"] == 0
    assert all(s["AP"] == 0.0 for s in m["folds"].values())
    assert capsys.readouterr().out == ""  # pycocotools' printing is silenced


def test_faster_coco_eval_gives_the_same_numbers():
    pytest.importorskip("faster_coco_eval")
    ds = _dataset(n_images=30)
    for table in (_stitched(ds, shift=2.5, extra=4), DETECTION_SCHEMA.empty_table()):
        slow = coco_metrics(ds, table, _folds(ds), K, evaluator="pycocotools")
        fast = coco_metrics(ds, table, _folds(ds), K, evaluator="faster_coco_eval")
        for part in ("pooled", *map(str, range(K))):
            a = slow["pooled"] if part == "pooled" else slow["folds"][part]
            b = fast["pooled"] if part == "pooled" else fast["folds"][part]
            assert a == pytest.approx(b, abs=1e-12)


def test_metrics_refuse_an_unknown_evaluator():
    ds = _dataset()
    with pytest.raises(ValueError, match="evaluator must be auto, pycocotools or faster_coco_eval"):
        coco_metrics(ds, DETECTION_SCHEMA.empty_table(), _folds(ds), K, evaluator="detectron2")
