"""The reducer: persisting streamed batches, resuming, and stitching them into a checked partition."""

from __future__ import annotations

import pickle

import numpy as np
import pyarrow as pa
import pytest

from kfold_ray._exceptions import StitchError
from kfold_ray.run._parts import FoldPartStore
from kfold_ray.run._reduce import Reducer
from kfold_ray.run._stitch import stitch
from kfold_ray._schema import (
    DETECTION_SCHEMA,
    batch_fold,
    batch_image_indices,
    make_prediction_batch,
)

N, K, C = 40, 4, 5
IMAGE_IDS = np.arange(N, dtype=np.int64) * 10 + 7
CATEGORY_IDS = np.array([1, 3, 8, 9, 20], dtype=np.int64)


def _fold_of_image(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).permutation(np.arange(N) % K).astype(np.int64)


def _batch(fold: int, images, rng: np.random.Generator, dets_per_image=None) -> pa.RecordBatch:
    images = np.asarray(images, dtype=np.int64)
    if dets_per_image is None:
        counts = rng.integers(0, 4, images.size)
    else:
        counts = np.full(images.size, dets_per_image)
    det_image = np.repeat(images, counts)
    d = det_image.size
    xy = rng.uniform(0, 50, (d, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(1, 20, (d, 2))], axis=1)
    scores = rng.choice([0.9, 0.5, 0.25, 0.125], d)  # ties on purpose: order must stay stable
    return make_prediction_batch(
        fold=fold, image_indices=images, det_image_index=det_image, boxes=boxes, scores=scores,
        classes=rng.integers(0, C, d), image_ids=IMAGE_IDS, category_ids=CATEGORY_IDS,
    )


def _fold_batches(fold_of_image: np.ndarray, seed: int = 0, per_batch: int = 3) -> list[pa.RecordBatch]:
    rng = np.random.default_rng(seed)
    out = []
    for f in range(K):
        held = np.flatnonzero(fold_of_image == f)
        for lo in range(0, held.size, per_batch):
            out.append(_batch(f, held[lo : lo + per_batch], rng))
    return out


def _reduce(tmp_path, batches, fold_of_image) -> pa.Table:
    reducer = Reducer(tmp_path)
    for b in batches:
        reducer.add(b)
    return reducer.finish(fold_of_image, N)


# ---- stitching ----------------------------------------------------------------------------------
def test_stitched_table_is_in_dataset_order_whatever_the_arrival_order(tmp_path):
    fold_of_image = _fold_of_image()
    batches = _fold_batches(fold_of_image)
    in_order = _reduce(tmp_path / "a", batches, fold_of_image)
    rng = np.random.default_rng(1)
    shuffled = [batches[i] for i in rng.permutation(len(batches))]  # folds interleaved
    assert _reduce(tmp_path / "b", shuffled, fold_of_image).equals(in_order)

    assert in_order.schema.equals(DETECTION_SCHEMA, check_metadata=True)
    img = in_order.column("image_index").to_numpy()
    score = in_order.column("score").to_numpy()
    assert (np.diff(img) >= 0).all()
    same_image = np.diff(img) == 0
    assert (np.diff(score)[same_image] <= 0).all()
    assert (in_order.column("fold").to_numpy() == fold_of_image[img]).all()
    assert in_order.num_rows == sum(b.num_rows for b in batches)


def test_ties_in_score_keep_the_folds_order():
    fold_of_image = np.zeros(N, dtype=np.int64)
    rng = np.random.default_rng(0)
    batch = _batch(0, np.arange(N), rng, dets_per_image=3)
    out = stitch({0: (pa.Table.from_batches([batch]), np.arange(N))}, fold_of_image, N)
    t = pa.Table.from_batches([batch]).to_pandas()
    expected = t.sort_values(["image_index", "score"], ascending=[True, False], kind="stable")
    assert np.array_equal(out.column("x1").to_numpy(), expected["x1"].to_numpy())


def test_images_without_detections_are_covered(tmp_path):
    fold_of_image = _fold_of_image()
    rng = np.random.default_rng(0)
    batches = [_batch(f, np.flatnonzero(fold_of_image == f), rng, dets_per_image=0) for f in range(K)]
    table = _reduce(tmp_path, batches, fold_of_image)
    assert table.num_rows == 0
    assert table.schema.equals(DETECTION_SCHEMA)


def test_missing_images_are_named(tmp_path):
    fold_of_image = _fold_of_image()
    batches = _fold_batches(fold_of_image)
    dropped = batches.pop(5)
    lost = sorted(batch_image_indices(dropped).tolist())
    named = ", ".join(map(str, lost))
    with pytest.raises(StitchError, match=rf"{len(lost)} images missing: \[{named}\]") as e:
        _reduce(tmp_path, batches, fold_of_image)
    assert e.value.missing == lost
    assert e.value.duplicated == [] and e.value.wrong_fold == []


def test_an_image_with_no_row_and_no_batch_is_missing():
    fold_of_image = np.zeros(N, dtype=np.int64)
    with pytest.raises(StitchError, match=r"1 images missing: \[39\]"):
        stitch({0: (DETECTION_SCHEMA.empty_table(), np.arange(N - 1))}, fold_of_image, N)


def test_duplicated_images_are_named(tmp_path):
    fold_of_image = _fold_of_image()
    batches = _fold_batches(fold_of_image)
    again = batch_image_indices(batches[2]).tolist()
    with pytest.raises(StitchError, match=r"predicted more than once: \[") as e:
        _reduce(tmp_path, batches + [batches[2]], fold_of_image)
    assert e.value.duplicated == sorted(again)


def test_an_image_predicted_by_a_fold_that_trained_on_it_is_named():
    fold_of_image = _fold_of_image()
    rng = np.random.default_rng(0)
    victim = int(np.flatnonzero(fold_of_image == 1)[0])
    folds = {}
    for f in range(K):
        held = np.flatnonzero(fold_of_image == f)
        if f == 1:
            held = held[held != victim]
        if f == 0:
            held = np.append(held, victim)  # fold 0 trained on it, yet predicts it
        b = _batch(f, held, rng)
        folds[f] = (pa.Table.from_batches([b]), batch_image_indices(b))
    msg = rf"image {victim} by fold 0 \(held out by fold 1\)"
    with pytest.raises(StitchError, match=msg) as e:
        stitch(folds, fold_of_image, N)
    assert e.value.wrong_fold == [victim]


def test_a_detection_row_for_an_image_the_fold_did_not_hold_out_is_refused():
    fold_of_image = np.array([0] * 20 + [1] * 20, dtype=np.int64)
    rng = np.random.default_rng(0)
    good0 = _batch(0, np.arange(20), rng, dets_per_image=1)
    stray = make_prediction_batch(  # a detection of image 25, which fold 1 holds out
        fold=0, image_indices=np.arange(0), det_image_index=np.array([25]), boxes=np.ones((1, 4)),
        scores=np.array([0.5]), classes=np.array([0]), image_ids=IMAGE_IDS, category_ids=CATEGORY_IDS,
    )
    t0 = pa.concat_tables(
        [pa.Table.from_batches([b]).replace_schema_metadata(None) for b in (good0, stray)]
    )
    b1 = _batch(1, np.arange(20, 40), rng)
    folds = {0: (t0, np.arange(20)), 1: (pa.Table.from_batches([b1]), np.arange(20, 40))}
    msg = r"fold 0: 1 detections for images it did not hold out.*\[25\]"
    with pytest.raises(StitchError, match=msg):
        stitch(folds, fold_of_image, N)


def test_a_fold_column_that_disagrees_with_the_part_is_refused():
    fold_of_image = np.zeros(N, dtype=np.int64)
    rng = np.random.default_rng(0)
    t = pa.Table.from_batches([_batch(0, np.arange(N), rng, dets_per_image=1)])
    t = t.set_column(t.schema.get_field_index("fold"), "fold", pa.array(np.ones(N, np.int32)))
    with pytest.raises(StitchError, match=r"40 images have detections whose fold column is not"):
        stitch({0: (t, np.arange(N))}, fold_of_image, N)


def test_at_most_ten_images_are_named():
    fold_of_image = np.zeros(N, dtype=np.int64)
    msg = r"25 images missing: \[15, 16, 17, 18, 19, 20, 21, 22, 23, 24, \.\.\.\]"
    with pytest.raises(StitchError, match=msg) as e:
        stitch({0: (DETECTION_SCHEMA.empty_table(), np.arange(15))}, fold_of_image, N)
    assert len(e.value.missing) == 10
    assert pickle.loads(pickle.dumps(e.value)).missing == e.value.missing


def test_non_finite_scores_are_refused():
    fold_of_image = np.zeros(N, dtype=np.int64)
    rng = np.random.default_rng(0)
    b = _batch(0, np.arange(N), rng, dets_per_image=1)
    t = pa.Table.from_batches([b])
    scores = t.column("score").to_numpy().copy()
    scores[3] = np.nan
    t = t.set_column(t.schema.get_field_index("score"), "score", pa.array(scores))
    with pytest.raises(StitchError, match=r"non-finite box or score in detections of images \[3\]"):
        stitch({0: (t, np.arange(N))}, fold_of_image, N)


def test_fold_of_image_must_match_the_dataset():
    with pytest.raises(ValueError, match=r"fold_of_image must be an int array of shape \(40,\)"):
        stitch({}, np.zeros(N - 1, dtype=np.int64), N)


# ---- the store --------------------------------------------------------------------------------
def test_store_round_trip_keeps_rows_and_image_indices(tmp_path):
    store = FoldPartStore(tmp_path)
    rng = np.random.default_rng(0)
    b0 = _batch(2, [4, 9, 1], rng)
    b1 = _batch(2, [30, 7], rng, dets_per_image=0)
    p0 = store.put(b0, seq=0)
    store.put(b1, seq=1)
    assert p0 == "parts/fold_002/00000000.arrow"
    assert (tmp_path / p0).is_file()
    table, images = store.read_fold(2)
    assert table.equals(pa.Table.from_batches([b0, b1]).replace_schema_metadata(None))
    assert images.tolist() == [4, 9, 1, 30, 7]
    assert store.covered_images(2).tolist() == [1, 4, 7, 9, 30]
    assert store.next_seq(2) == 2
    assert store.folds() == [2]
    empty, none = store.read_fold(3)
    assert empty.num_rows == 0 and none.size == 0 and store.next_seq(3) == 0


def test_store_ignores_leftover_tmp_files(tmp_path):
    store = FoldPartStore(tmp_path)
    rng = np.random.default_rng(0)
    store.put(_batch(0, [1, 2], rng), seq=0)
    d = tmp_path / store.fold_dir(0)
    (d / ".00000001.arrow.k3j2.tmp").write_bytes(b"half a file")
    (d / "00000007.arrow.tmp").write_bytes(b"junk")
    assert store.next_seq(0) == 1
    assert store.covered_images(0).tolist() == [1, 2]
    assert len(store.part_paths(0)) == 1
    assert store.read_fold(0)[1].tolist() == [1, 2]


def test_fold_done_marker(tmp_path):
    store = FoldPartStore(tmp_path)
    assert not store.is_fold_done(1)
    store.mark_fold_done(1, {"images": 10, "seconds": 1.5})
    assert store.is_fold_done(1)
    assert store.fold_done_info(1) == {"images": 10, "seconds": 1.5}
    store.clear_fold(1)
    assert not store.is_fold_done(1)


def test_a_failed_write_leaves_no_part(tmp_path, monkeypatch):
    store = FoldPartStore(tmp_path)
    rng = np.random.default_rng(0)

    class Boom(pa.ipc.RecordBatchFileWriter):
        def write_batch(self, *args, **kwargs):
            super().write_batch(*args, **kwargs)
            raise OSError("disk full")

    monkeypatch.setattr(pa.ipc, "new_file", Boom)
    with pytest.raises(OSError, match="disk full"):
        store.put(_batch(0, [1, 2], rng, dets_per_image=2), seq=0)
    d = tmp_path / store.fold_dir(0)
    assert not d.exists() or list(d.iterdir()) == []
    assert store.covered_images(0).size == 0


def test_a_batch_without_metadata_is_refused(tmp_path):
    rng = np.random.default_rng(0)
    bare = _batch(0, [1], rng).replace_schema_metadata(None)
    with pytest.raises(StitchError, match="lacks its fold / image indices metadata"):
        Reducer(tmp_path).add(bare)


def test_a_part_from_another_fold_is_refused(tmp_path):
    store = FoldPartStore(tmp_path)
    rng = np.random.default_rng(0)
    path = tmp_path / store.put(_batch(1, [3], rng), seq=0)
    (tmp_path / store.fold_dir(0)).mkdir(parents=True)
    path.rename(tmp_path / store.fold_dir(0) / path.name)  # a part misplaced by hand
    with pytest.raises(StitchError, match="holds a batch of fold 1, not fold 0"):
        store.read_fold(0)


# ---- the reducer ------------------------------------------------------------------------------
def test_reducer_counts_progress_and_resumes(tmp_path):
    fold_of_image = _fold_of_image()
    batches = _fold_batches(fold_of_image)
    first, rest = batches[::2], batches[1::2]
    reducer = Reducer(tmp_path)
    for b in first:
        reducer.add(b)
    expected = {
        f: sum(batch_image_indices(b).size for b in first if batch_fold(b) == f) for f in range(K)
    }
    assert reducer.progress() == expected

    resumed = Reducer(tmp_path)  # a new driver on the same run dir
    assert resumed.progress() == expected
    for b in rest:
        resumed.add(b)
    assert resumed.progress() == {f: int((fold_of_image == f).sum()) for f in range(K)}
    assert all(resumed.store.next_seq(f) > 0 for f in range(K))
    table = resumed.finish(fold_of_image, N)
    assert table.equals(_reduce(tmp_path / "other", batches, fold_of_image))


def test_reducer_finish_names_a_fold_that_never_reported(tmp_path):
    fold_of_image = _fold_of_image()
    batches = [b for b in _fold_batches(fold_of_image) if batch_fold(b) != 3]
    with pytest.raises(StitchError, match=rf"{int((fold_of_image == 3).sum())} images missing"):
        _reduce(tmp_path, batches, fold_of_image)


def test_a_row_for_an_image_its_part_does_not_cover_is_refused(tmp_path):
    store = FoldPartStore(tmp_path)
    rng = np.random.default_rng(0)
    good = _batch(0, [1, 2], rng, dets_per_image=2)
    rows = good.column("image_index").to_numpy().copy()
    rows[0] = 5  # a detection of image 5 in a batch that covers images 1 and 2
    cols = [pa.array(rows) if n == "image_index" else good.column(n) for n in good.schema.names]
    store.put(pa.RecordBatch.from_arrays(cols, schema=good.schema), seq=0)
    with pytest.raises(StitchError, match=r"1 detections for images the part does not cover: images \[5\]"):
        store.read_fold(0)


def test_box_losses_travel_with_their_part_and_stay_inside_it(tmp_path):
    from kfold_ray._schema import BOX_LOSS_SCHEMA, with_box_losses

    def losses(images, rows):
        n = len(rows)
        return pa.table({"image_index": np.asarray(images, np.int64), "ann_row": np.asarray(rows, np.int64),
                         **{f.name: pa.array(np.full(n, 1), type=f.type) for f in BOX_LOSS_SCHEMA
                            if f.name not in ("image_index", "ann_row")}}, schema=BOX_LOSS_SCHEMA)

    rng = np.random.default_rng(0)
    reducer = Reducer(tmp_path)
    reducer.add(with_box_losses(_batch(0, [1, 2], rng), losses([1, 2, 2], [3, 5, 4])))
    reducer.add(with_box_losses(_batch(1, [0], rng), losses([0], [0])))
    reducer.finish(np.array([1, 0, 0]), 3)
    got = reducer.box_losses()
    assert got.column("image_index").to_pylist() == [0, 1, 2, 2]
    assert got.column("ann_row").to_pylist() == [0, 3, 4, 5]
    store = FoldPartStore(tmp_path / "bad")
    store.put(with_box_losses(_batch(0, [1], rng), losses([7], [9])), seq=0)
    with pytest.raises(StitchError, match="1 box losses for images the part does not cover"):
        store.read_box_losses(0)


def test_a_part_from_before_the_new_loss_columns_stitches_with_nulls_there(tmp_path):
    """A run resumed across kfold-ray versions: an older part carries box losses without
    p_other / other_class / refined_iou; they come out null, the rest as written."""
    from kfold_ray._schema import BOX_LOSS_BASE_COLUMNS, BOX_LOSS_SCHEMA, with_box_losses

    rng = np.random.default_rng(0)
    reducer = Reducer(tmp_path)
    old = pa.table({"image_index": np.array([0], np.int64), "ann_row": np.array([0], np.int64),
                    **{c: np.array([0.25], np.float32) for c in BOX_LOSS_BASE_COLUMNS[2:]}})
    new = pa.table({f.name: pa.array([1], type=f.type) for f in BOX_LOSS_SCHEMA})
    reducer.add(with_box_losses(_batch(1, [0], rng), old))
    reducer.add(with_box_losses(_batch(0, [1], rng), new))
    reducer.finish(np.array([1, 0]), 2)
    got = reducer.box_losses()
    assert got.schema.equals(BOX_LOSS_SCHEMA)
    assert got.column("p_given").to_pylist() == [0.25, 1.0]
    assert got.column("p_other").to_pylist() == [None, 1.0]
    assert got.column("other_class").to_pylist() == [None, 1]
