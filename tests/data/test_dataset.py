"""kfold_ray.data._dataset: loading a COCO dataset, and the one-line errors for every kind of bad input."""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from cocofactory import AWKWARD_NAME, coco_dict, edit_coco, make_coco, read_coco, upload_tree, write_coco
from PIL import Image

from kfold_ray.data.validate import _files, _jpeg, _masks
from kfold_ray.data._dataset import CocoDataset, load_coco, read_image_bytes
from kfold_ray._exceptions import DatasetError, StorageError


@pytest.fixture
def awkward(tmp_path: Path) -> tuple[Path, Path, CocoDataset]:
    ann, img_dir = make_coco(tmp_path, awkward=True)
    return ann, img_dir, load_coco(ann, img_dir)


# ---- valid input ------------------------------------------------------------------------------
def test_images_keep_file_order_not_id_order(awkward):
    ann, _, ds = awkward
    doc = read_coco(ann)
    assert ds.image_ids.tolist() == [im["id"] for im in doc["images"]]
    assert ds.image_ids.tolist() != sorted(ds.image_ids.tolist())
    assert list(ds.file_names) == [im["file_name"] for im in doc["images"]]
    assert ds.widths.tolist() == [im["width"] for im in doc["images"]]
    assert ds.heights.tolist() == [im["height"] for im in doc["images"]]
    assert len(set(zip(ds.widths.tolist(), ds.heights.tolist()))) > 1  # mixed sizes
    assert ds.image_ids.dtype == ds.widths.dtype == ds.heights.dtype == np.int64


def test_boxes_are_xyxy_grouped_per_image_in_json_order(awkward):
    ann, _, ds = awkward
    doc = read_coco(ann)
    assert ds.boxes.dtype == np.float32 and ds.boxes.shape == (len(doc["annotations"]), 4)
    assert ds.ann_offsets[0] == 0 and ds.ann_offsets[-1] == len(doc["annotations"])
    for i, image_id in enumerate(ds.image_ids.tolist()):
        mine = [a for a in doc["annotations"] if a["image_id"] == image_id]
        boxes, classes, crowd = ds.annotations_of(i)
        lo, hi = ds.ann_offsets[i], ds.ann_offsets[i + 1]
        assert ds.ann_ids[lo:hi].tolist() == [a["id"] for a in mine]
        xyxy = [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in mine)]
        np.testing.assert_array_equal(boxes, np.array(xyxy, dtype=np.float32).reshape(-1, 4))
        assert crowd.tolist() == [bool(a["iscrowd"]) for a in mine]


def test_annotations_interleaved_in_the_json_are_grouped(tmp_path):
    rng = np.random.default_rng(1)
    ann, img_dir = make_coco(tmp_path, mutate=lambda d: rng.shuffle(d["annotations"]))
    ds = load_coco(ann, img_dir)
    doc = read_coco(ann)
    for i, image_id in enumerate(ds.image_ids.tolist()):
        lo, hi = ds.ann_offsets[i], ds.ann_offsets[i + 1]
        assert ds.ann_ids[lo:hi].tolist() == [a["id"] for a in doc["annotations"] if a["image_id"] == image_id]


def test_class_index_is_rank_of_category_id_both_ways(awkward):
    ann, _, ds = awkward
    doc = read_coco(ann)
    assert ds.category_ids.tolist() == [3, 7, 11]
    assert ds.class_of_category == {3: 0, 7: 1, 11: 2}
    assert ds.class_names == ["class_0", "class_1", "class_2"]
    by_id = {a["id"]: a["category_id"] for a in doc["annotations"]}
    assert [by_id[a] for a in ds.ann_ids.tolist()] == ds.category_ids[ds.classes].tolist()
    assert ds.classes.dtype == np.int64


def test_categories_sorted_by_id_whatever_the_json_order(tmp_path):
    ann, img_dir = make_coco(tmp_path, awkward=True, mutate=lambda d: d["categories"].reverse())
    ds = load_coco(ann, img_dir)
    assert [c.id for c in ds.categories] == [3, 7, 11]
    assert ds.categories[0].supercategory == "shape"


def test_crowd_kept_and_left_out_of_cleanlab_labels(awkward):
    _, _, ds = awkward
    assert ds.iscrowd.dtype == bool and ds.iscrowd.sum() == 1
    labels = ds.cleanlab_labels()
    assert len(labels) == ds.num_images
    for i, lab in enumerate(labels):
        boxes, classes, crowd = ds.annotations_of(i)
        np.testing.assert_array_equal(lab["bboxes"], boxes[~crowd])
        np.testing.assert_array_equal(lab["labels"], classes[~crowd])
        assert lab["bboxes"].dtype == np.float32 and lab["labels"].dtype == np.int64
    crowd_image = int(np.searchsorted(ds.ann_offsets, np.flatnonzero(ds.iscrowd)[0], side="right") - 1)
    assert len(labels[crowd_image]["labels"]) == ds.annotations_of(crowd_image)[0].shape[0] - 1


def test_image_without_annotations_is_kept(awkward):
    ann, _, ds = awkward
    empty_id = read_coco(ann)["images"][1]["id"]
    i = ds.image_ids.tolist().index(empty_id)
    assert ds.ann_offsets[i] == ds.ann_offsets[i + 1]
    lab = ds.cleanlab_labels()[i]
    assert lab["bboxes"].shape == (0, 4) and lab["bboxes"].dtype == np.float32
    assert lab["labels"].shape == (0,)
    assert ds.classes_present()[i].size == 0


def test_image_extras_kept_as_plain_dicts(tmp_path):
    def add(d):
        d["images"][0]["license"] = 4
        d["images"][0]["coco_url"] = "http://x/1.jpg"

    ann, img_dir = make_coco(tmp_path, mutate=add)
    ds = load_coco(ann, img_dir)
    assert ds.image_extras[0] == {"video_id": 0, "license": 4, "coco_url": "http://x/1.jpg"}
    assert ds.image_extras[5] == {"video_id": 1}
    assert all(type(e) is dict for e in ds.image_extras)


def test_non_ascii_file_name_in_subfolder(awkward):
    _, img_dir, ds = awkward
    assert AWKWARD_NAME in ds.file_names
    i = ds.file_names.index(AWKWARD_NAME)
    assert ds.image_path(i) == str(img_dir / AWKWARD_NAME)
    assert ds.read_image_bytes(i) == (img_dir / AWKWARD_NAME).read_bytes()


def test_image_root_defaults_to_the_json_folder(tmp_path):
    ann, img_dir = make_coco(tmp_path)
    moved = img_dir / "instances.json"
    shutil.move(ann, moved)
    ds = load_coco(str(moved))
    assert ds.image_root == str(img_dir) and ds.annotations_path == str(moved)
    assert type(ds.image_root) is str and Path(ds.image_root).is_absolute()


def test_boxes_within_one_pixel_outside_are_clipped(tmp_path):
    def nudge(d):
        w = d["images"][0]["width"]
        a, b = [a for a in d["annotations"] if a["image_id"] == d["images"][0]["id"]][:1] * 2
        a["bbox"] = [-0.75, 2, 10, 10]  # x1 0.75 px left of the image
        d["annotations"].append({**b, "id": 999, "bbox": [w - 10, 0, 10.5, 5]})

    ann, img_dir = make_coco(tmp_path, mutate=nudge)
    ds = load_coco(ann, img_dir)
    first = ds.ann_ids.tolist()
    assert ds.boxes[first.index(1)].tolist() == [0.0, 2.0, 9.25, 12.0]
    w = float(ds.widths[0])
    assert ds.boxes[first.index(999)].tolist() == [w - 10, 0.0, w, 5.0]


def test_fingerprint_tracks_json_and_image_files_not_location(tmp_path):
    ann, img_dir = make_coco(tmp_path / "a")
    fp = load_coco(ann, img_dir).fingerprint
    assert re.fullmatch(r"[0-9a-f]{64}", fp)
    assert load_coco(ann, img_dir, check_images=False).fingerprint == fp
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    assert load_coco(tmp_path / "b" / ann.name, tmp_path / "b" / "images").fingerprint == fp
    # an image file replaced by another of the same size but other bytes is not seen (stat only)
    with open(img_dir / "img_00003.png", "ab") as f:
        f.write(b"\0")  # trailing bytes after IEND: still a valid PNG, other size
    fp_file = load_coco(ann, img_dir).fingerprint
    assert fp_file != fp
    edit_coco(ann, lambda d: d["info"].update(description="changed"))
    assert load_coco(ann, img_dir).fingerprint not in (fp, fp_file)


def test_dataset_pickles(awkward):
    _, _, ds = awkward
    back = pickle.loads(pickle.dumps(ds))
    np.testing.assert_array_equal(back.boxes, ds.boxes)
    assert back.fingerprint == ds.fingerprint and back.categories == ds.categories


def test_soft_problems_are_warnings(tmp_path):
    def extra(d):
        d["categories"].append({"id": 99, "name": "never_seen"})
        d["categories"].append({"id": 100, "name": "class_0"})

    ann, img_dir = make_coco(tmp_path, mutate=extra)
    with pytest.warns(UserWarning) as record:
        ds = load_coco(ann, img_dir)
    messages = [str(w.message) for w in record]
    assert any("no (non-crowd) annotations" in m and "99 \"never_seen\"" in m for m in messages)
    assert any("category names used by more than one id" in m and '"class_0"' in m for m in messages)
    assert ds.num_classes == 5 and all("\n" not in m for m in messages)
    assert record[0].filename == __file__  # points at the caller


def test_valid_dataset_loads_without_warnings(tmp_path):
    ann, img_dir = make_coco(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_coco(ann, img_dir)


@pytest.mark.filterwarnings("ignore:.*no \\(non-crowd\\) annotations")
def test_exif_rotated_jpeg_uses_the_turned_size(tmp_path):
    ann, img_dir = make_coco(tmp_path, n_images=3)
    _to_jpeg(ann, img_dir, 0, orientation=6)  # stored 96x80, shown (and read by Detectron2) 80x96

    def turn(d):
        d["images"][0].update(width=80, height=96)
        d["annotations"] = [a for a in d["annotations"] if a["image_id"] != d["images"][0]["id"]]

    edit_coco(ann, turn)
    assert load_coco(ann, img_dir).widths[0] == 80


def test_bad_argument_types():
    with pytest.raises(TypeError, match="annotations must be a path"):
        load_coco(3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="check_images must be True or False"):
        load_coco("x.json", check_images="yes")  # type: ignore[arg-type]


def test_two_thousand_images_load(tmp_path):
    ann, img_dir = make_coco(tmp_path, n_images=2000, size=(32, 32), boxes_per_image=(0, 4))
    ds = load_coco(ann, img_dir)
    assert ds.num_images == 2000 and ds.ann_offsets[-1] == len(read_coco(ann)["annotations"])


# ---- bad input: every check, with the one-line message it gives --------------------------------
Mutation = Callable[[Path, Path], Any]  # (annotations json, image dir) -> None


def doc_edit(fn: Callable[[dict], Any]) -> Mutation:
    return lambda ann, img_dir: edit_coco(ann, fn)


def raw_text(text: str | bytes) -> Mutation:
    data = text.encode() if isinstance(text, str) else text
    return lambda ann, img_dir: ann.write_bytes(data)


def set_in(section: str, i: int, **fields) -> Mutation:
    return doc_edit(lambda d: d[section][i].update(fields))


def drop_in(section: str, i: int, key: str) -> Mutation:
    return doc_edit(lambda d: d[section][i].pop(key))


def bbox(i: int, value) -> Mutation:
    return set_in("annotations", i, bbox=value)


def _to_jpeg(ann: Path, img_dir: Path, i: int, *, orientation: int | None = None) -> Path:
    png = img_dir / f"img_{i:05d}.png"
    jpg = png.with_suffix(".jpg")
    im = Image.open(png).convert("RGB")
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    im.save(jpg, quality=90, exif=exif.tobytes())
    edit_coco(ann, lambda d: d["images"][i].update(file_name=jpg.name))
    return jpg


def truncate_file(i: int, keep: float, jpeg: bool = False) -> Mutation:
    def run(ann, img_dir):
        path = _to_jpeg(ann, img_dir, i) if jpeg else img_dir / f"img_{i:05d}.png"
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * keep)])

    return run


def flip_png_byte(ann: Path, img_dir: Path) -> None:
    path = img_dir / "img_00004.png"
    data = bytearray(path.read_bytes())
    at = data.index(b"IDAT") + 12  # inside the compressed pixels: a CRC mismatch
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def _no_annotations_for(d: dict) -> None:
    d["annotations"] = [a for a in d["annotations"] if False]


J = "json"  # the json is the file at fault
I4 = "img_00004.png"  # that image file is at fault

BAD: list[Any] = [
    # -- structure
    pytest.param(raw_text('{"images": [1,, 2]}'), r"^invalid JSON at line 1, column 15: Expecting value$", J, id="json-syntax"),
    pytest.param(lambda a, i: a.write_bytes(a.read_bytes()[:500]), r"^invalid JSON at line 1, column \d+: .* \(the file ends early: truncated\?\)$", J, id="json-truncated"),
    pytest.param(raw_text('{"images": []\n,\n  "x": }'), r"^invalid JSON at line 3, column 8: ", J, id="json-line-col"),
    pytest.param(raw_text(""), r"^annotations file is empty$", J, id="json-empty"),
    pytest.param(raw_text(b'{"a": "\xe9t\xe9"}'), r"^not UTF-8 text \(byte 7\)", J, id="json-not-utf8"),
    pytest.param(lambda a, i: a.unlink(), r"^annotations file not found$", J, id="json-missing"),
    pytest.param(raw_text("[]"), r"^top level must be a json object, got array$", J, id="top-level-list"),
    pytest.param(doc_edit(lambda d: d.pop("images")), r"^missing top-level field 'images'$", J, id="no-images-field"),
    pytest.param(doc_edit(lambda d: d.pop("annotations")), r"^missing top-level field 'annotations'$", J, id="no-annotations-field"),
    pytest.param(doc_edit(lambda d: d.pop("categories")), r"^missing top-level field 'categories'$", J, id="no-categories-field"),
    pytest.param(doc_edit(lambda d: d.update(images={})), r"^'images' must be a list, got object$", J, id="images-not-list"),
    pytest.param(doc_edit(lambda d: d.update(annotations=None)), r"^'annotations' must be a list, got null$", J, id="annotations-null"),
    pytest.param(doc_edit(lambda d: d.update(categories="cat")), r"^'categories' must be a list, got string$", J, id="categories-string"),
    pytest.param(doc_edit(lambda d: d["images"].__setitem__(2, 5)), r"^images\[2\]: must be a json object, got integer 5$", J, id="image-not-object"),
    pytest.param(doc_edit(lambda d: d["annotations"].__setitem__(1, [1])), r"^annotations\[1\]: must be a json object, got array \[1\]$", J, id="annotation-not-object"),
    # -- categories
    pytest.param(doc_edit(lambda d: d.update(categories=[])), r"^'categories' is empty", J, id="categories-empty"),
    pytest.param(set_in("categories", 2, id=1), r"^categories\[2\] \(id 1\): duplicate category id, first used by categories\[0\]$", J, id="category-dup-id"),
    pytest.param(set_in("categories", 1, id=2.0), r"^categories\[1\]: 'id' must be an integer, got 2\.0 \(number\)$", J, id="category-id-float"),
    pytest.param(set_in("categories", 1, id=True), r"^categories\[1\]: 'id' must be an integer, got true \(boolean\)$", J, id="category-id-bool"),
    pytest.param(drop_in("categories", 0, "id"), r"^categories\[0\]: missing 'id'$", J, id="category-id-missing"),
    pytest.param(drop_in("categories", 1, "name"), r"^categories\[1\] \(id 2\): missing 'name'$", J, id="category-name-missing"),
    pytest.param(set_in("categories", 1, name=7), r"^categories\[1\] \(id 2\): 'name' must be a non-empty string, got 7$", J, id="category-name-int"),
    pytest.param(set_in("categories", 1, supercategory=["a"]), r"^categories\[1\] \(id 2\): 'supercategory' must be a string", J, id="category-super-list"),
    # -- images
    pytest.param(doc_edit(lambda d: d.update(images=[])), r"^'images' is empty: the dataset has no images$", J, id="images-empty"),
    pytest.param(set_in("images", 5, id=2), r"^images\[5\] \(id 2\): duplicate image id, first used by images\[1\]$", J, id="image-dup-id"),
    pytest.param(set_in("images", 3, id=4.0), r"^images\[3\]: 'id' must be an integer, got 4\.0 \(number\)$", J, id="image-id-float"),
    pytest.param(set_in("images", 3, id=False), r"^images\[3\]: 'id' must be an integer, got false \(boolean\)$", J, id="image-id-bool"),
    pytest.param(set_in("images", 3, id="4"), r"^images\[3\]: 'id' must be an integer, got \"4\" \(string\)$", J, id="image-id-string"),
    pytest.param(set_in("images", 3, id=2**64), r"^images\[3\] \(id 18446744073709551616\): 'id' 18446744073709551616 does not fit in 64 bits$", J, id="image-id-huge"),
    pytest.param(drop_in("images", 6, "id"), r"^images\[6\]: missing 'id'$", J, id="image-id-missing"),
    pytest.param(drop_in("images", 2, "file_name"), r"^images\[2\] \(id 3\): missing 'file_name'$", J, id="file-name-missing"),
    pytest.param(set_in("images", 2, file_name=""), r"^images\[2\] \(id 3\): 'file_name' is empty$", J, id="file-name-empty"),
    pytest.param(set_in("images", 2, file_name=None), r"^images\[2\] \(id 3\): 'file_name' must be a string, got null", J, id="file-name-null"),
    pytest.param(set_in("images", 2, file_name="/etc/passwd"), r"^images\[2\] \(id 3\): 'file_name' \"/etc/passwd\" is absolute; it must be relative to the image root$", J, id="file-name-absolute"),
    pytest.param(set_in("images", 2, file_name="C:\\data\\a.png"), r"^images\[2\] \(id 3\): 'file_name' .* is absolute; it must be relative", J, id="file-name-windows-absolute"),
    pytest.param(set_in("images", 2, file_name="D:a.png"), r"^images\[2\] \(id 3\): 'file_name' \"D:a\.png\" is absolute; it must be relative", J, id="file-name-drive"),
    pytest.param(set_in("images", 2, file_name="a\0.png"), r"^images\[2\] \(id 3\): 'file_name' \"a\\u0000\.png\" contains a NUL character$", J, id="file-name-nul"),
    pytest.param(set_in("images", 2, file_name="../a.png"), r"^images\[2\] \(id 3\): 'file_name' \"\.\./a\.png\" escapes the image root with '\.\.'$", J, id="file-name-dotdot"),
    pytest.param(set_in("images", 2, file_name="x/../../a.png"), r"^images\[2\] \(id 3\): 'file_name' .* escapes the image root", J, id="file-name-dotdot-nested"),
    pytest.param(set_in("images", 7, file_name="./img_00001.png"), r"^images\[7\] \(id 8\): 'file_name' \"\./img_00001\.png\" is also used by images\[1\] \(id 2\)$", J, id="file-name-twice"),
    pytest.param(drop_in("images", 4, "width"), r"^images\[4\] \(id 5\): missing 'width'$", J, id="width-missing"),
    pytest.param(set_in("images", 4, width=0), r"^images\[4\] \(id 5\): 'width' must be positive, got 0$", J, id="width-zero"),
    pytest.param(set_in("images", 4, height=-80), r"^images\[4\] \(id 5\): 'height' must be positive, got -80$", J, id="height-negative"),
    pytest.param(set_in("images", 4, width=96.0), r"^images\[4\] \(id 5\): 'width' must be an integer, got 96\.0 \(number\)$", J, id="width-float"),
    pytest.param(set_in("images", 4, height="80"), r"^images\[4\] \(id 5\): 'height' must be an integer, got \"80\" \(string\)$", J, id="height-string"),
    # -- annotations
    pytest.param(doc_edit(_no_annotations_for), r"^'annotations' is empty: nothing to train on$", J, id="annotations-empty"),
    pytest.param(doc_edit(lambda d: [a.update(iscrowd=1) for a in d["annotations"]]), r"^all \d+ annotations are crowd \('iscrowd': 1\): nothing to train on$", J, id="annotations-all-crowd"),
    pytest.param(set_in("annotations", 3, id=1), r"^annotations\[3\] \(id 1\): duplicate annotation id, first used by annotations\[0\]$", J, id="annotation-dup-id"),
    pytest.param(set_in("annotations", 3, id=[4]), r"^annotations\[3\]: 'id' must be an integer, got \[4\] \(array\)$", J, id="annotation-id-list"),
    pytest.param(set_in("annotations", 3, image_id=777), r"^annotations\[3\] \(id 4\): 'image_id' 777 is not in 'images'$", J, id="annotation-unknown-image"),
    pytest.param(set_in("annotations", 3, image_id=1.0), r"^annotations\[3\] \(id 4\): 'image_id' must be an integer, got 1\.0 \(number\)$", J, id="annotation-image-id-float"),
    pytest.param(drop_in("annotations", 3, "image_id"), r"^annotations\[3\] \(id 4\): missing 'image_id'$", J, id="annotation-image-id-missing"),
    pytest.param(set_in("annotations", 3, category_id=9), r"^annotations\[3\] \(id 4\): 'category_id' 9 is not in 'categories'$", J, id="annotation-unknown-category"),
    pytest.param(set_in("annotations", 3, category_id=None), r"^annotations\[3\] \(id 4\): 'category_id' must be an integer, got null \(null\)$", J, id="annotation-category-null"),
    pytest.param(drop_in("annotations", 3, "bbox"), r"^annotations\[3\] \(id 4\): missing 'bbox'$", J, id="bbox-missing"),
    pytest.param(bbox(3, "1,2,3,4"), r"^annotations\[3\] \(id 4\): 'bbox' must be a list of 4 numbers \[x, y, width, height\], got \"1,2,3,4\"$", J, id="bbox-string"),
    pytest.param(bbox(3, [1, 2, 3]), r"^annotations\[3\] \(id 4\): 'bbox' must be a list of 4 numbers .*, got \[1, 2, 3\]$", J, id="bbox-three"),
    pytest.param(bbox(3, [1, 2, 3, 4, 5]), r"^annotations\[3\] \(id 4\): 'bbox' must be a list of 4 numbers", J, id="bbox-five"),
    pytest.param(bbox(3, [1, 2, "3", 4]), r"^annotations\[3\] \(id 4\): 'bbox' must hold 4 numbers .*, got \[1, 2, \"3\", 4\]$", J, id="bbox-string-item"),
    pytest.param(bbox(3, [1, 2, True, 4]), r"^annotations\[3\] \(id 4\): 'bbox' must hold 4 numbers", J, id="bbox-bool-item"),
    pytest.param(bbox(3, [1, None, 3, 4]), r"^annotations\[3\] \(id 4\): 'bbox' must hold 4 numbers", J, id="bbox-null-item"),
    pytest.param(bbox(3, [1, 2, float("nan"), 4]), r"^annotations\[3\] \(id 4\): 'bbox' \[1, 2, NaN, 4\] is not finite$", J, id="bbox-nan"),
    pytest.param(bbox(3, [1, 2, 3, float("inf")]), r"^annotations\[3\] \(id 4\): 'bbox' \[1, 2, 3, Infinity\] is not finite$", J, id="bbox-inf"),
    pytest.param(bbox(3, [10, 2, -4.0, 4]), r"^annotations\[3\] \(id 4\): 'bbox' \[10, 2, -4\.0, 4\] has negative width -4\.0$", J, id="bbox-negative-width"),
    pytest.param(bbox(3, [10, 2, 4, 0]), r"^annotations\[3\] \(id 4\): 'bbox' \[10, 2, 4, 0\] has zero height$", J, id="bbox-zero-height"),
    pytest.param(bbox(3, [90, 2, 10, 4]), r"^annotations\[3\] \(id 4\): 'bbox' \[90, 2, 10, 4\] reaches more than 1 px outside its image \d+ \(96x80\)$", J, id="bbox-outside-right"),
    pytest.param(bbox(3, [10, -1.5, 10, 4]), r"^annotations\[3\] \(id 4\): 'bbox' .* reaches more than 1 px outside", J, id="bbox-outside-top"),
    pytest.param(bbox(3, [96.5, 2, 0.4, 4]), r"^annotations\[3\] \(id 4\): 'bbox' \[96\.5, 2, 0\.4, 4\] lies outside its image", J, id="bbox-in-margin-only"),
    pytest.param(set_in("annotations", 3, iscrowd=2), r"^annotations\[3\] \(id 4\): 'iscrowd' must be 0 or 1, got 2$", J, id="iscrowd-two"),
    pytest.param(set_in("annotations", 3, iscrowd="1"), r"^annotations\[3\] \(id 4\): 'iscrowd' must be 0 or 1, got \"1\"$", J, id="iscrowd-string"),
    pytest.param(set_in("annotations", 3, iscrowd=1.0), r"^annotations\[3\] \(id 4\): 'iscrowd' must be 0 or 1, got 1\.0$", J, id="iscrowd-float"),
    # -- files
    pytest.param(lambda a, i: shutil.rmtree(i), r"^image root does not exist$", "root", id="root-missing"),
    pytest.param(lambda a, i: (i / "img_00004.png").unlink(), r"^images\[4\] \(id 5\): file \"img_00004\.png\" not found under image root .*images$", J, id="image-missing"),
    pytest.param(set_in("images", 4, file_name="sub\\img_00004.png"), r"^images\[4\] \(id 5\): file .* not found under image root .* \(it uses '\\'; write '/' between folders\)$", J, id="image-missing-backslash"),
    pytest.param(lambda a, i: ((i / "img_00004.png").unlink(), (i / "img_00004.png").mkdir()), r"^images\[4\] \(id 5\): \"img_00004\.png\" under image root .* is not a file$", J, id="image-is-folder"),
    pytest.param(lambda a, i: (i / "img_00004.png").write_text("hello\nworld"), r"^images\[4\] \(id 5\): corrupt or unreadable image \"img_00004\.png\": cannot identify image file", I4, id="image-not-an-image"),
    pytest.param(truncate_file(4, 0.6), r"^images\[4\] \(id 5\): corrupt or unreadable image \"img_00004\.png\": ", I4, id="image-truncated-png"),
    pytest.param(flip_png_byte, r"^images\[4\] \(id 5\): corrupt or unreadable image \"img_00004\.png\": broken PNG file \(bad header checksum in b'IDAT'\)$", I4, id="image-png-bad-crc"),
    pytest.param(truncate_file(4, 0.7, jpeg=True), r"^images\[4\] \(id 5\): corrupt or unreadable image \"img_00004\.jpg\": truncated JPEG \(no end-of-image marker\)$", "img_00004.jpg", id="image-truncated-jpeg"),
    pytest.param(set_in("images", 4, width=95), r"^images\[4\] \(id 5\): 'width'/'height' 95x80 do not match the file \"img_00004\.png\", which is 96x80$", J, id="image-size-mismatch"),
    pytest.param(lambda a, i: _to_jpeg(a, i, 4, orientation=8), r"^images\[4\] \(id 5\): 'width'/'height' 96x80 do not match the file \"img_00004\.jpg\", which is 80x96 after its EXIF rotation$", J, id="image-exif-turned"),
]


@pytest.mark.parametrize("spoil, pattern, fault", BAD)
def test_bad_input_raises_one_line_error(tmp_path, spoil: Mutation, pattern: str, fault: str):
    ann, img_dir = make_coco(tmp_path)
    spoil(ann, img_dir)
    with pytest.raises(DatasetError) as info:
        load_coco(ann, img_dir)
    err = info.value
    assert isinstance(err, ValueError)
    assert re.search(pattern, err.message), err.message
    expected = {J: ann, "root": img_dir}.get(fault, img_dir / fault)
    assert err.path == str(expected)
    assert str(err) == f"{err.path}: {err.message}"
    assert "\n" not in str(err) and "\r" not in str(err)
    back = pickle.loads(pickle.dumps(err))
    assert (back.message, back.path) == (err.message, err.path)


def test_one_line_even_when_values_hold_newlines(tmp_path):
    ann, img_dir = make_coco(tmp_path, mutate=lambda d: d["images"][2].update(file_name="a\nb.png"))
    with pytest.raises(DatasetError, match=r"images\[2\] \(id 3\): file \"a\\nb\.png\" not found") as info:
        load_coco(ann, img_dir)
    assert "\n" not in str(info.value)


def test_long_values_are_shortened(tmp_path):
    ann, img_dir = make_coco(tmp_path, mutate=lambda d: d["annotations"][0].update(bbox=list(range(500))))
    with pytest.raises(DatasetError) as info:
        load_coco(ann, img_dir)
    assert len(str(info.value)) < len(str(ann)) + 160 and str(info.value).endswith("...")


def test_first_problem_in_check_order_is_reported(tmp_path):
    def many(d):
        d["annotations"][0]["bbox"] = [0, 0, -1, 1]  # annotation stage
        d["images"][5]["width"] = 0  # image stage: comes first
        d["annotations"][1]["bbox"] = [0, 0, 1, -1]

    ann, img_dir = make_coco(tmp_path, mutate=many)
    (img_dir / "img_00000.png").unlink()  # file stage: comes last
    with pytest.raises(DatasetError, match=r"^.*: images\[5\] \(id 6\): 'width' must be positive"):
        load_coco(ann, img_dir)


def test_first_bad_image_file_in_json_order(tmp_path):
    ann, img_dir = make_coco(tmp_path, n_images=300, size=(16, 16))
    for i in (299, 170, 65):
        (img_dir / f"img_{i:05d}.png").unlink()
    with pytest.raises(DatasetError, match=r"images\[65\] \(id 66\): file \"img_00065\.png\" not found"):
        load_coco(ann, img_dir)


def test_check_images_false_only_looks_files_up(tmp_path):
    ann, img_dir = make_coco(tmp_path)
    (img_dir / "img_00004.png").write_bytes(b"not a png")
    edit_coco(ann, lambda d: d["images"][3].update(width=95))
    ds = load_coco(ann, img_dir, check_images=False)
    assert ds.num_images == 12
    (img_dir / "img_00004.png").unlink()
    with pytest.raises(DatasetError, match=r"images\[4\] \(id 5\): file \"img_00004\.png\" not found"):
        load_coco(ann, img_dir, check_images=False)


def test_cocofactory_dict_round_trips(tmp_path):
    doc = coco_dict(awkward=True)
    write_coco(tmp_path / "x.json", doc)
    assert read_coco(tmp_path / "x.json") == json.loads(json.dumps(doc))


# ---- images and annotations in an object store (a local moto S3 server) -------------------------
@pytest.fixture
def bucket(s3) -> str:
    """``s3://<a new bucket>`` on the session's moto server (conftest's `s3`: the AWS variables
    of this process point at it while the test runs)."""
    return s3.uri()


def _error(fn: Callable[[], Any], kind: type[Exception] = DatasetError) -> Exception:
    with pytest.raises(kind) as info:
        fn()
    assert "\n" not in str(info.value) and "\r" not in str(info.value)
    return info.value


def test_s3_dataset_loads_like_its_local_copy(tmp_path, bucket):
    """Annotations and images on S3: the same dataset, fingerprint included, as the local copy."""
    import pyarrow.fs as pafs

    ann, img_dir = make_coco(tmp_path, awkward=True)
    _to_jpeg(ann, img_dir, 0, orientation=3)  # a JPEG too (EXIF 3: turned 180, same sides)
    local = load_coco(ann, img_dir)
    data = upload_tree(tmp_path, f"{bucket}/data")
    ds = load_coco(f"{data}/annotations.json", f"{data}/images")
    assert ds.fingerprint == local.fingerprint
    assert load_coco(f"{data}/annotations.json", f"{data}/images", check_images=False).fingerprint == local.fingerprint
    assert (ds.annotations_path, ds.image_root) == (f"{data}/annotations.json", f"{data}/images")
    i = ds.file_names.index(AWKWARD_NAME)
    assert ds.image_path(i) == f"{data}/images/{AWKWARD_NAME}"
    assert ds.read_image_bytes(i) == local.read_image_bytes(i) == (img_dir / AWKWARD_NAME).read_bytes()
    np.testing.assert_array_equal(ds.boxes, local.boxes)
    # pickled as plain strings; the unpickled copy opens the store itself
    back = pickle.loads(pickle.dumps(ds))
    assert "S3FileSystem" not in repr(pickle.dumps(ds))
    fs, path = back.image_filesystem(i)
    assert isinstance(fs, pafs.S3FileSystem) and path == f"{data[5:]}/images/{AWKWARD_NAME}"
    assert back.image_filesystem(i)[0] is fs  # cached per process
    assert read_image_bytes(f"{data}/images", "img_00000.jpg") == (img_dir / "img_00000.jpg").read_bytes()
    from kfold_ray.report._overlays import _load_image  # the report's overlays read through the store

    image, readable = _load_image(back, i)
    assert readable and image.size == (int(ds.widths[i]), int(ds.heights[i]))


def test_s3_image_root_defaults_to_the_json_folder(tmp_path, bucket):
    ann, img_dir = make_coco(tmp_path)
    shutil.move(ann, img_dir / "instances.json")
    data = upload_tree(img_dir, f"{bucket}/imgs")
    ds = load_coco(f"{data}/instances.json")
    assert ds.image_root == data and ds.num_images == 12
    assert ds.image_path(0) == f"{data}/img_00000.png"


def _spoils() -> list[Any]:
    ids = ["image-missing", "image-is-folder", "image-not-an-image", "image-truncated-png",
           "image-png-bad-crc", "image-truncated-jpeg", "image-size-mismatch", "image-exif-turned"]  # fmt: skip
    return [p for p in BAD if p.id in ids]


@pytest.mark.parametrize("spoil, pattern, fault", _spoils())
def test_s3_bad_image_same_one_line_error_as_local(tmp_path, bucket, spoil, pattern, fault):
    ann, img_dir = make_coco(tmp_path / "d")
    spoil(ann, img_dir)
    if (img_dir / "img_00004.png").is_dir():  # an object store has no empty folders
        (img_dir / "img_00004.png" / "x.png").write_bytes(b"x")
    here = _error(lambda: load_coco(ann, img_dir))
    data = upload_tree(tmp_path / "d", f"{bucket}/d")
    there = _error(lambda: load_coco(f"{data}/annotations.json", f"{data}/images"))
    assert re.search(pattern, there.message), there.message
    to_s3 = lambda text: text.replace(str(tmp_path / "d"), data)  # noqa: E731
    assert (there.message, there.path) == (to_s3(here.message), to_s3(here.path))


def _big_jpeg(path: Path, size: tuple[int, int] = (400, 300), *, icc: int = 0, orientation: int = 0) -> bytes:
    """A JPEG of noise (hundreds of KiB), optionally with a large ICC profile ahead of its pixels
    (its header then runs past HEAD_BYTES) and an EXIF orientation."""
    rng = np.random.default_rng(0)
    im = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    extra = {"icc_profile": bytes(icc)} if icc else {}
    im.save(path, quality=95, exif=exif.tobytes(), **extra)
    return path.read_bytes()


def _with_big_jpegs(tmp_path: Path) -> tuple[Path, Path]:
    def big(d):
        d["images"][0].update(file_name="big.jpg", width=400, height=300)
        d["images"][1].update(file_name="big_icc.jpg", width=800, height=1000)  # EXIF 6: turned
        d["annotations"] = [a for a in d["annotations"] if a["image_id"] > 2]

    ann, img_dir = make_coco(tmp_path, mutate=big)
    _big_jpeg(img_dir / "big.jpg")
    data = _big_jpeg(img_dir / "big_icc.jpg", (1000, 800), icc=150_000, orientation=6)
    assert data.index(b"\xff\xda") > _files.HEAD_BYTES  # start of scan past the first read
    return ann, img_dir


@pytest.mark.filterwarnings("ignore:.*no \\(non-crowd\\) annotations")
def test_large_jpegs_are_judged_by_ranged_reads(tmp_path, monkeypatch):
    ann, img_dir = _with_big_jpegs(tmp_path)
    read: dict[int, list[tuple[int, int]]] = {}
    real_pread = os.pread

    def pread(fd, n, offset):
        read.setdefault(os.fstat(fd).st_size, []).append((n, offset))
        return real_pread(fd, n, offset)

    monkeypatch.setattr(os, "pread", pread)
    ds = load_coco(ann, img_dir)
    assert ds.widths[:2].tolist() == [400, 800]
    big = (img_dir / "big.jpg").stat().st_size
    assert big > 2 * _files.HEAD_BYTES
    assert read[big] == [(_files.HEAD_BYTES, 0), (_files.TAIL_BYTES, big - _files.TAIL_BYTES)]
    icc = (img_dir / "big_icc.jpg").stat().st_size
    assert sum(n for n, _ in read[icc]) < icc  # grew past the ICC profile, not to the whole file
    # a large truncated JPEG is still caught, by its tail
    data = (img_dir / "big.jpg").read_bytes()
    (img_dir / "big.jpg").write_bytes(data[: len(data) * 7 // 10])
    err = _error(lambda: load_coco(ann, img_dir))
    assert err.message.endswith('"big.jpg": truncated JPEG (no end-of-image marker)')


@pytest.mark.filterwarnings("ignore:.*no \\(non-crowd\\) annotations")
@pytest.mark.parametrize("whole_below", [None, 0], ids=["small-read-whole", "ranged-reads"])
def test_large_jpegs_on_s3(tmp_path, bucket, monkeypatch, whole_below):
    if whole_below is not None:
        monkeypatch.setattr(_files, "REMOTE_WHOLE_BYTES", whole_below)
    ann, img_dir = _with_big_jpegs(tmp_path / "d")
    data = upload_tree(tmp_path / "d", f"{bucket}/d")
    ds = load_coco(f"{data}/annotations.json", f"{data}/images")
    assert ds.widths[:2].tolist() == [400, 800] and ds.fingerprint == load_coco(ann, img_dir).fingerprint
    whole = (img_dir / "big.jpg").read_bytes()
    fs, path = ds.image_filesystem(0)
    with fs.open_output_stream(path) as f:
        f.write(whole[:-5000])
    err = _error(lambda: load_coco(f"{data}/annotations.json", f"{data}/images"))
    assert err.message == 'images[0] (id 1): corrupt or unreadable image "big.jpg": truncated JPEG (no end-of-image marker)'
    assert err.path == f"{data}/images/big.jpg"


def test_s3_missing_annotations_or_image_root(tmp_path, bucket):
    ann, img_dir = make_coco(tmp_path)
    data = upload_tree(tmp_path, f"{bucket}/data")
    err = _error(lambda: load_coco(f"{data}/nope.json"))
    assert (err.message, err.path) == ("annotations file not found", f"{data}/nope.json")
    err = _error(lambda: load_coco(f"{data}/annotations.json", f"{data}/no_images"))
    assert (err.message, err.path) == ("image root does not exist", f"{data}/no_images")
    err = _error(lambda: load_coco(f"{data}/images"))
    assert err.message == "annotations path is a folder, not a json file"


def test_s3_missing_bucket_is_one_line_naming_the_location(tmp_path, bucket):
    ann, img_dir = make_coco(tmp_path)
    data = upload_tree(tmp_path, f"{bucket}/data")
    err = _error(lambda: load_coco("s3://no-such-bucket-kfold/data/annotations.json"), StorageError)
    assert str(err) == ("annotations s3://no-such-bucket-kfold/data/annotations.json: "
                        "bucket 'no-such-bucket-kfold' does not exist")  # fmt: skip
    err = _error(lambda: load_coco(f"{data}/annotations.json", "s3://no-such-bucket-kfold/images"),
                 StorageError)  # fmt: skip
    assert str(err) == "image root s3://no-such-bucket-kfold/images: bucket 'no-such-bucket-kfold' does not exist"
    assert isinstance(err, ValueError)  # a bad-input error: the CLI prints one line, exit code 2


def test_s3_bad_credentials_are_one_line_naming_the_location(monkeypatch):
    from clusters import AWS_CONFLICTING_VARS, S3Server

    monkeypatch.setenv("INITIAL_NO_AUTH_ACTION_COUNT", "0")  # a server that checks every request's keys
    with S3Server() as server:
        for name in AWS_CONFLICTING_VARS:
            monkeypatch.delenv(name, raising=False)
        for name, value in {**server.env, "AWS_ACCESS_KEY_ID": "nope", "AWS_SECRET_ACCESS_KEY": "nope"}.items():
            monkeypatch.setenv(name, value)
        err = _error(lambda: load_coco("s3://kfold-data/data/annotations.json"), StorageError)
    assert str(err).startswith("annotations s3://kfold-data/data/annotations.json: cannot read the storage (")
    assert "ACCESS_DENIED" in str(err) and str(err).endswith("check its credentials and endpoint")


def test_unknown_scheme_and_shortened_uri_are_one_line():
    err = _error(lambda: load_coco("nosuch://bucket/annotations.json"), StorageError)
    assert str(err).startswith("annotations 'nosuch://bucket/annotations.json': cannot open storage")
    err = _error(lambda: load_coco(Path("s3://bucket/annotations.json")), StorageError)
    assert "pass URIs as str" in str(err)


def test_file_uri_is_a_local_path(tmp_path):
    ann, img_dir = make_coco(tmp_path)
    ds = load_coco(ann.as_uri(), img_dir.as_uri())
    assert (ds.annotations_path, ds.image_root) == (str(ann), str(img_dir))
    assert ds.fingerprint == load_coco(ann, img_dir).fingerprint


def test_dataset_built_with_paths_keeps_strings(tmp_path):
    ann, img_dir = make_coco(tmp_path)
    ds = load_coco(ann, img_dir)
    fields = {f: getattr(ds, f) for f in CocoDataset.__dataclass_fields__}
    again = CocoDataset(**{**fields, "annotations_path": ann, "image_root": img_dir})
    assert again.image_root == str(img_dir) and again.image_path(0) == str(img_dir / "img_00000.png")
    assert read_image_bytes(again, 0) == (img_dir / "img_00000.png").read_bytes()


def _jpeg_variants() -> dict[str, bytes]:
    """JPEGs as cameras and tools write them: modes, progressive, EXIF orientations, ICC, XMP..."""
    rng = np.random.default_rng(3)
    base = Image.fromarray(rng.integers(0, 256, (24, 40, 3), dtype=np.uint8))
    out = {}
    for orientation in range(0, 9):
        exif = Image.Exif()
        if orientation:
            exif[0x0112] = orientation
        exif[0x010F] = "camera"  # Make: another IFD0 tag around it
        out[f"exif-{orientation}"] = exif.tobytes()
    variants = {}
    for name, exif in out.items():
        for mode in ("RGB", "L", "CMYK"):
            for extra in ({}, {"progressive": True}, {"icc_profile": bytes(300)}, {"dpi": (300, 300)},
                          {"comment": b"hello"}, {"subsampling": 0, "optimize": True},
                          {"xmp": b'<x:xmpmeta><rdf:Description tiff:Orientation="6"/></x:xmpmeta>'}):  # fmt: skip
                buf = io.BytesIO()
                base.convert(mode).save(buf, format="JPEG", exif=exif, **extra)
                variants[f"{name}-{mode}-{'-'.join(extra) or 'plain'}"] = buf.getvalue()
    return variants


def _pillow_header(data: bytes):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with Image.open(io.BytesIO(data)) as im:
                return (*im.size, im.getexif().get(0x0112) or 0)
        except Exception:  # noqa: BLE001 - any failure: the fast path must not have said ok
            return "error"


def test_fast_jpeg_header_agrees_with_pillow():
    """The marker reader that spares Pillow's Python parser gives Pillow's size and orientation,
    or steps aside; also on headers with random bytes changed."""
    rng = np.random.default_rng(0)
    read = 0
    for name, data in _jpeg_variants().items():
        fast = _jpeg.jpeg_header(data, Image.MAX_IMAGE_PIXELS)
        if fast is not None:
            read += 1
            assert fast == _pillow_header(data), name
        else:
            assert "xmp" in name, name  # XMP may carry an orientation: Pillow reads those
        sos = data.index(b"\xff\xda")
        for _ in range(40):
            spoilt = bytearray(data)
            for at in rng.integers(2, sos + 4, size=int(rng.integers(1, 4))):
                spoilt[at] = int(rng.integers(256))
            fast = _jpeg.jpeg_header(bytes(spoilt), Image.MAX_IMAGE_PIXELS)
            if isinstance(fast, tuple):
                assert fast == _pillow_header(bytes(spoilt)), (name, bytes(spoilt[:sos + 4]).hex())
    assert read >= 160


def test_remote_check_opens_a_client_per_connection_pool(bucket):
    """One pyarrow S3 client keeps 25 requests in flight: 64 threads get 3 clients."""
    from kfold_ray.storage._storage import open_location

    files = _files.ImageFiles(*open_location(f"{bucket}/x")[:2], f"{bucket}/x")
    clients = _files._clients(files, -(-_files.REMOTE_THREADS // _files.REMOTE_CONNECTIONS))
    assert len(clients) == 3 and len({id(c.fs) for c in clients}) == 3
    assert {(c.root, c.location) for c in clients} == {(files.root, files.location)}


# ---- every problem at once --------------------------------------------------------------------
def test_sixty_missing_files_are_all_reported(tmp_path):
    ann, img_dir = make_coco(tmp_path, n_images=70, size=(16, 16))
    for i in range(5, 65):
        (img_dir / f"img_{i:05d}.png").unlink()
    err = _error(lambda: load_coco(ann, img_dir))
    assert err.problem_count == 60 and len(err.problems) == 50
    assert err.message.startswith('images[5] (id 6): file "img_00005.png" not found') and err.path == str(ann)
    assert str(err).startswith(f"{ann}: images[5] (id 6)") and "(+59 more problems" in str(err)
    for k, line in enumerate(err.problems):
        assert line == f'{ann}: images[{k + 5}] (id {k + 6}): file "img_{k + 5:05d}.png" not found under image root {img_dir}'
    back = pickle.loads(pickle.dumps(err))
    assert (back.message, back.path, back.problems, back.problem_count, str(back)) == (
        err.message, err.path, err.problems, err.problem_count, str(err))


def test_one_problem_is_one_line_and_lists_itself(tmp_path):
    ann, img_dir = make_coco(tmp_path)
    (img_dir / "img_00004.png").unlink()
    err = _error(lambda: load_coco(ann, img_dir))
    assert err.problem_count == 1 and err.problems == [str(err)] == [f"{err.path}: {err.message}"]


def test_problems_of_every_stage_in_check_then_json_order(tmp_path):
    def spoil(d):
        d["categories"][1]["name"] = ""
        d["images"][5]["width"] = 0  # its boxes and its file size are not checked against it
        d["images"][2]["file_name"] = "/abs.png"  # its file is not looked up
        d["annotations"][4]["bbox"] = [0, 0, -1, 1]  # one problem, not also "lies outside"
        d["annotations"][1].update(category_id=99, iscrowd=3)  # two problems of one record
        d["annotations"][0]["image_id"] = 777  # its box is not checked against an image

    ann, img_dir = make_coco(tmp_path, mutate=spoil)
    (img_dir / "img_00007.png").write_bytes(b"junk")
    (img_dir / "img_00009.png").unlink()
    err = _error(lambda: load_coco(ann, img_dir))
    got = [line.split(": ", 1) for line in err.problems]
    assert [p for p, _ in got] == [str(ann)] * 7 + [str(img_dir / "img_00007.png"), str(ann)]
    assert [re.sub(r" \(id \d+\)", "", m).split(":")[0] for _, m in got] == [
        "categories[1]", "images[2]", "images[5]", "annotations[0]", "annotations[1]",
        "annotations[1]", "annotations[4]", "images[7]", "images[9]"]
    text = "\n".join(err.problems)
    assert "'category_id' 99 is not in 'categories'" in text and "'iscrowd' must be 0 or 1, got 3" in text
    assert "outside" not in text and "'image_id' 777 is not in 'images'" in text
    assert err.problem_count == 9 and all("\n" not in p for p in err.problems)


def test_structural_problems_stop_at_once(tmp_path):
    def spoil(d):
        d["images"][3]["id"] = d["images"][0]["id"]
        d["annotations"][0]["bbox"] = [0, 0, -1, 1]

    ann, img_dir = make_coco(tmp_path, mutate=spoil)
    err = _error(lambda: load_coco(ann, img_dir))
    assert err.problem_count == 1 and "duplicate image id" in err.message


def test_many_bad_boxes_only_the_shown_ones_get_messages(tmp_path):
    ann, img_dir = make_coco(tmp_path, n_images=300, size=(16, 16), boxes_per_image=(2, 2))
    edit_coco(ann, lambda d: [a.update(bbox=[0, 0, 0, 3]) for a in d["annotations"]])
    err = _error(lambda: load_coco(ann, img_dir))
    assert err.problem_count == 600 and len(err.problems) == 50
    assert err.problems[49].endswith("annotations[49] (id 50): 'bbox' [0, 0, 0, 3] has zero width")


# ---- exclude_unreadable -------------------------------------------------------------------------
def _two_unreadable(ann: Path, img_dir: Path) -> None:
    truncate_file(3, 0.7, jpeg=True)(ann, img_dir)  # images[3]: a truncated JPEG
    (img_dir / "img_00008.png").unlink()  # images[8]: no file


def test_exclude_unreadable_leaves_them_and_their_annotations_out(tmp_path):
    ann, img_dir = make_coco(tmp_path, segmentation="polygon")
    _two_unreadable(ann, img_dir)
    doc = read_coco(ann)
    err = _error(lambda: load_coco(ann, img_dir))  # without the flag: both are errors
    assert err.problem_count == 2 and "truncated JPEG" in err.problems[0] and "not found" in err.problems[1]
    with pytest.warns(UserWarning, match=r"excluded 2 images whose file cannot be read") as record:
        ds = load_coco(ann, img_dir, exclude_unreadable=True)
    assert len(record) == 1 and "\n" not in str(record[0].message) and record[0].filename == __file__
    assert ds.image_ids.tolist() == [im["id"] for k, im in enumerate(doc["images"]) if k not in (3, 8)]
    assert [(e.image_id, e.file_name) for e in ds.excluded] == [(4, "img_00003.jpg"), (9, "img_00008.png")]
    assert ds.excluded[0].reason == 'corrupt or unreadable image "img_00003.jpg": truncated JPEG (no end-of-image marker)'
    assert ds.excluded[1].reason == f'file "img_00008.png" not found under image root {img_dir}'
    assert json.loads(json.dumps(ds.excluded_records())) == [
        {"image_id": e.image_id, "file_name": e.file_name, "reason": e.reason} for e in ds.excluded]
    kept = [a for a in doc["annotations"] if a["image_id"] not in (4, 9)]
    assert ds.ann_ids.tolist() == [a["id"] for a in kept] and ds.ann_offsets[-1] == len(kept)
    assert [ds.segmentation(r) for r in range(len(kept))] == [a["segmentation"] for a in kept]
    # the same as a json that never listed them, but for the fingerprint
    other = tmp_path / "other"
    shutil.copytree(img_dir, other / "images")
    write_coco(other / "annotations.json", {**doc, "images": [im for k, im in enumerate(doc["images"]) if k not in (3, 8)],
                                            "annotations": kept})
    same = load_coco(other / "annotations.json", other / "images")
    assert same.excluded == () and same.image_ids.tolist() == ds.image_ids.tolist()
    np.testing.assert_array_equal(same.boxes, ds.boxes)
    np.testing.assert_array_equal(same.ann_offsets, ds.ann_offsets)
    assert same.fingerprint != ds.fingerprint
    # the files fixed: the same dataset with or without the flag, and not the one with exclusions
    make_coco(tmp_path / "fresh", segmentation="polygon")
    shutil.copy(tmp_path / "fresh" / "images" / "img_00008.png", img_dir)
    edit_coco(ann, lambda d: d["images"][3].update(file_name="img_00003.png"))
    fixed = load_coco(ann, img_dir)
    assert load_coco(ann, img_dir, exclude_unreadable=True).fingerprint == fixed.fingerprint != ds.fingerprint
    assert fixed.excluded == ()
    back = pickle.loads(pickle.dumps(ds))
    assert back.excluded == ds.excluded and back.fingerprint == ds.fingerprint


def test_exclude_unreadable_keeps_json_problems_errors(tmp_path):
    ann, img_dir = make_coco(tmp_path)
    _two_unreadable(ann, img_dir)
    edit_coco(ann, lambda d: d["images"][5].update(width=95))  # a size mismatch: the json's fault
    err = _error(lambda: load_coco(ann, img_dir, exclude_unreadable=True))
    assert err.problem_count == 1 and "'width'/'height' 95x80 do not match" in err.message


def test_exclude_unreadable_without_files_to_exclude_changes_nothing(tmp_path):
    ann, img_dir = make_coco(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = load_coco(ann, img_dir, exclude_unreadable=True)
    assert ds.excluded == () and ds.fingerprint == load_coco(ann, img_dir).fingerprint


def test_exclude_unreadable_only_looks_files_up_without_check_images(tmp_path):
    ann, img_dir = make_coco(tmp_path)
    _two_unreadable(ann, img_dir)
    with pytest.warns(UserWarning, match="excluded 1 image whose file"):
        ds = load_coco(ann, img_dir, check_images=False, exclude_unreadable=True)
    assert [e.file_name for e in ds.excluded] == ["img_00008.png"] and ds.num_images == 11


def test_every_image_excluded_is_an_error(tmp_path):
    ann, img_dir = make_coco(tmp_path, n_images=3)
    for p in img_dir.iterdir():
        p.write_bytes(b"junk")
    err = _error(lambda: load_coco(ann, img_dir, exclude_unreadable=True))
    assert err.message == ("all 3 images were excluded as unreadable (exclude_unreadable), the first as "
                           'corrupt or unreadable image "img_00000.png": cannot identify image file '
                           f"{str(img_dir / 'img_00000.png')!r}")


def test_every_annotated_image_excluded_is_an_error(tmp_path):
    ann, img_dir = make_coco(tmp_path, n_images=3, mutate=lambda d: d.update(
        annotations=[a for a in d["annotations"] if a["image_id"] == 1]))
    (img_dir / "img_00000.png").unlink()
    err = _error(lambda: load_coco(ann, img_dir, exclude_unreadable=True))
    assert err.message == "after excluding 1 unreadable image, none of the annotations is left: nothing to train on"


def test_exclude_unreadable_must_be_a_bool():
    with pytest.raises(TypeError, match="exclude_unreadable must be True or False"):
        load_coco("x.json", exclude_unreadable=1)  # type: ignore[arg-type]


# ---- segmentations ----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["polygon", "rle", "rle-string", "mixed"])
def test_segmentations_are_kept_as_in_the_json(tmp_path, kind):
    ann, img_dir = make_coco(tmp_path, awkward=True, segmentation=kind)
    ds = load_coco(ann, img_dir)
    by_id = {a["id"]: a["segmentation"] for a in read_coco(ann)["annotations"]}
    assert [ds.segmentation(r) for r in range(len(ds.ann_ids))] == [by_id[a] for a in ds.ann_ids.tolist()]
    for i in range(ds.num_images):
        lo, hi = ds.ann_offsets[i], ds.ann_offsets[i + 1]
        assert ds.segmentations_of(i) == [by_id[a] for a in ds.ann_ids[lo:hi].tolist()]
    assert ds.has_segmentations and ds.segmentation_problem() is None
    assert ds.mask_format == ("polygon" if kind == "polygon" else "bitmask")
    back = pickle.loads(pickle.dumps(ds))
    assert [back.segmentation(r) for r in range(len(ds.ann_ids))] == [by_id[a] for a in ds.ann_ids.tolist()]


def test_crowd_rle_does_not_call_for_bitmasks(tmp_path):
    ann, img_dir = make_coco(tmp_path, awkward=True, segmentation="polygon")
    ds = load_coco(ann, img_dir)
    crowd_row = int(np.flatnonzero(ds.iscrowd)[0])
    assert isinstance(ds.segmentation(crowd_row), dict) and ds.mask_format == "polygon"


def test_segmentations_pickle_as_a_few_arrays(tmp_path):
    def twenty_points(d):  # polygons of a realistic size: 20 points on the box's outline
        for a in d["annotations"]:
            x, y, w, h = a["bbox"]
            t = np.linspace(0, 1, 5, endpoint=False)
            a["segmentation"] = [np.concatenate([
                np.stack([x + w * t, np.full(5, y)], 1), np.stack([np.full(5, x + w), y + h * t], 1),
                np.stack([x + w * (1 - t), np.full(5, y + h)], 1), np.stack([np.full(5, x), y + h * (1 - t)], 1),
            ]).ravel().round(2).tolist()]

    ann, img_dir = make_coco(tmp_path, n_images=200, size=(32, 32), mutate=twenty_points)
    ds = load_coco(ann, img_dir)
    seg = ds.segmentations
    assert seg.coords.dtype == np.float32 and seg.coords.size == 40 * len(ds.ann_ids)
    rows = [ds.segmentation(r) for r in range(len(ds.ann_ids))]
    assert rows == [[np.float32(v).item() for v in a["segmentation"][0]] and [[np.float32(v).item() for v in a["segmentation"][0]]]
                    for a in sorted(read_coco(ann)["annotations"], key=lambda a: a["image_id"])]
    assert len(pickle.dumps(seg)) < 0.6 * len(pickle.dumps(rows))


def test_segmentation_problem_names_the_first_annotation_without_one(tmp_path):
    def spoil(d):
        d["annotations"][7].pop("segmentation")
        d["annotations"][4]["segmentation"] = []  # as some tools write "no mask"

    ann, img_dir = make_coco(tmp_path, segmentation="polygon", mutate=spoil)
    ds = load_coco(ann, img_dir)  # not an error: only MODEL.MASK_ON needs masks
    n = len(ds.ann_ids)
    assert not ds.has_segmentations
    assert ds.segmentation_problem() == (f"annotations[4] (id 5): 'segmentation' is empty, which "
                                         f"MODEL.MASK_ON needs (2 of {n} non-crowd annotations have none)")
    assert ds.segmentation(list(ds.ann_ids).index(8)) is None
    plain = load_coco(*make_coco(tmp_path / "plain"))
    assert plain.segmentation_problem().startswith("annotations[0] (id 1): no 'segmentation', which MODEL.MASK_ON needs")
    assert plain.mask_format == "polygon"


def _seg(i: int, value) -> Mutation:
    return doc_edit(lambda d: d["annotations"][i].update(segmentation=value))


def _rle(size, counts) -> dict:
    return {"size": size, "counts": counts}


BAD_SEGMENTATIONS = [
    pytest.param(_seg(3, "abc"), r"^annotations\[3\] \(id 4\): 'segmentation' must be a list of polygons or an RLE object \{\"size\", \"counts\"\}, got \"abc\" \(string\)$", id="string"),
    pytest.param(_seg(3, [1, 2, 3, 4, 5, 6]), r"^annotations\[3\] \(id 4\): 'segmentation' must be a list of polygons \[\[x1, y1, x2, y2, \.\.\.\], \.\.\.\], got a flat list of numbers \[1, 2, 3, 4, 5, 6\]: put each polygon in a list of its own$", id="flat-polygon"),
    pytest.param(_seg(3, [[1, 2, 3, 4]]), r"^annotations\[3\] \(id 4\): 'segmentation' polygon 0 has 4 numbers; a polygon needs at least 3 points \(6 numbers\)$", id="polygon-two-points"),
    pytest.param(_seg(3, [[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6, 7]]), r"^annotations\[3\] \(id 4\): 'segmentation' polygon 1 has an odd count of numbers \(7\); it must be x, y pairs$", id="polygon-odd"),
    pytest.param(_seg(3, [[1, 2, 3, "4", 5, 6]]), r"^annotations\[3\] \(id 4\): 'segmentation' polygon 0 must hold numbers only, got \[1, 2, 3, \"4\", 5, 6\]$", id="polygon-string-item"),
    pytest.param(_seg(3, [[1, 2, 3, True, 5, 6]]), r"^annotations\[3\] \(id 4\): 'segmentation' polygon 0 must hold numbers only", id="polygon-bool-item"),
    pytest.param(_seg(3, [[1, 2, 3, float("nan"), 5, 6]]), r"^annotations\[3\] \(id 4\): 'segmentation' polygon 0 \[1, 2, 3, NaN, 5, 6\] is not finite$", id="polygon-nan"),
    pytest.param(_seg(3, [{"x": 1}]), r"^annotations\[3\] \(id 4\): 'segmentation' polygon 0 must be a list of numbers \[x1, y1, x2, y2, \.\.\.\], got \{\"x\": 1\}$", id="polygon-object"),
    pytest.param(_seg(3, _rle([96, 80], [7680])), r"^annotations\[3\] \(id 4\): 'segmentation' RLE 'size' \[96, 80\] does not match its image 2 \(96x80\), whose \[height, width\] is \[80, 96\]$", id="rle-size-mismatch"),
    pytest.param(_seg(3, _rle([80, 96], [100, 20])), r"^annotations\[3\] \(id 4\): 'segmentation' RLE 'counts' cover 120 pixels, not height x width = 80x96 = 7680$", id="rle-counts-short"),
    pytest.param(_seg(3, _rle([80, 96], [7000, -20, 700])), r"^annotations\[3\] \(id 4\): 'segmentation' RLE 'counts' must be non-negative integers", id="rle-counts-negative"),
    pytest.param(_seg(3, _rle([80, 96], "0a~")), r"^annotations\[3\] \(id 4\): 'segmentation' RLE 'counts' \"0a~\" is not a valid compressed RLE string$", id="rle-string-bad-char"),
    pytest.param(_seg(3, _rle([80, 96], "T3d0")), r"^annotations\[3\] \(id 4\): 'segmentation' RLE 'counts' cover 120 pixels, not height x width = 80x96 = 7680$", id="rle-string-short"),
    pytest.param(_seg(3, _rle([80, 96], 7680)), r"^annotations\[3\] \(id 4\): 'segmentation' RLE 'counts' must be a list of run lengths or a compressed RLE string, got 7680 \(integer\)$", id="rle-counts-int"),
    pytest.param(_seg(3, {"counts": [7680]}), r"^annotations\[3\] \(id 4\): 'segmentation' RLE object is missing 'size' \(\[height, width\]\)$", id="rle-no-size"),
    pytest.param(_seg(3, {"size": [80, 96]}), r"^annotations\[3\] \(id 4\): 'segmentation' RLE object is missing 'counts'$", id="rle-no-counts"),
    pytest.param(_seg(3, _rle([80.0, 96], [7680])), r"^annotations\[3\] \(id 4\): 'segmentation' RLE 'size' must be \[height, width\], 2 positive integers, got \[80\.0, 96\]$", id="rle-size-float"),
]


@pytest.mark.parametrize("spoil, pattern", BAD_SEGMENTATIONS)
def test_bad_segmentation_is_one_line_for_the_mask_trainer_only(tmp_path, spoil, pattern):
    """A segmentation that cannot be used does not stop the load (a box detector never reads
    it): it is listed, its row holds no mask, and `mask_error` is the one-line error a model
    that trains masks raises."""
    ann, img_dir = make_coco(tmp_path, segmentation="polygon")
    spoil(ann, img_dir)
    ds = load_coco(ann, img_dir)
    assert len(ds.mask_problems) == 1 and ds.mask_problems[0].startswith(f"{ann}: ")
    row = list(ds.ann_ids).index(4)
    assert ds.segmentation(row) is None
    err = ds.mask_error()
    assert isinstance(err, DatasetError) and err.problem_count == 1
    assert re.search(pattern, err.message), err.message
    assert err.path == str(ann) and str(err) == f"{err.path}: {err.message}"
    assert ds.mask_warning().startswith("1 annotation has a segmentation that cannot be used, "
                                        "ignored since the model trains boxes only")


def test_rle_string_total_matches_pycocotools():
    mask_util = pytest.importorskip("pycocotools.mask")
    from cocofactory import rle_counts, rle_string

    rng = np.random.default_rng(0)
    for t in range(200):
        h, w = (int(v) for v in rng.integers(1, 300, 2))
        mask = (rng.random((h, w)) < rng.random()).astype(np.uint8)
        if t % 5 == 0:
            mask[:] = t % 2
        encoded = mask_util.encode(np.asfortranarray(mask))["counts"].decode()
        assert rle_string(rle_counts(mask)) == encoded
        assert _masks.rle_string_total(encoded) == h * w
        assert _masks.rle_string_total(encoded[:-1]) != h * w


def test_excluded_images_take_their_masks_along(tmp_path):
    ann, img_dir = make_coco(tmp_path, awkward=True, segmentation="mixed")
    doc = read_coco(ann)
    gone = {doc["images"][k]["id"] for k in (0, 2, 5)}  # image 2 holds the crowd RLE
    for k in (0, 2, 5):
        (img_dir / doc["images"][k]["file_name"]).unlink()
    with pytest.warns(UserWarning, match=r"excluded 3 images .*; images\[5\]"):
        ds = load_coco(ann, img_dir, exclude_unreadable=True)
    by_id = {a["id"]: a["segmentation"] for a in doc["annotations"] if a["image_id"] not in gone}
    assert sorted(ds.ann_ids.tolist()) == sorted(by_id)
    assert [ds.segmentation(r) for r in range(len(ds.ann_ids))] == [by_id[a] for a in ds.ann_ids.tolist()]
    assert not ds.iscrowd.any() and ds.mask_format == "bitmask"
    seg = ds.segmentations
    assert len(seg) == len(ds.ann_ids) and seg.rle_sizes.shape == (len(seg.rle_counts), 2)


def test_segmentation_problems_are_kept_apart_from_the_others(tmp_path):
    def spoil(d):
        d["annotations"][2]["segmentation"] = [[1, 2, 3]]
        d["annotations"][5]["segmentation"] = {"size": [1, 1], "counts": [1]}

    ann, img_dir = make_coco(tmp_path, segmentation="polygon", mutate=spoil)
    ds = load_coco(ann, img_dir)
    assert [p.split(": ")[1] for p in ds.mask_problems] == ["annotations[2] (id 3)", "annotations[5] (id 6)"]
    assert "RLE 'size' [1, 1] does not match" in ds.mask_problems[1]
    assert ds.mask_error().problems == list(ds.mask_problems)
    assert ds.mask_warning().startswith("2 annotations have a segmentation that cannot be used")
    # A box problem is still an error at load time, and the mask problems do not hide it.
    spoil_box = doc_edit(lambda d: d["annotations"][5].update(bbox=[0, 0, 0, 1]))
    spoil_box(ann, img_dir)
    err = _error(lambda: load_coco(ann, img_dir))
    assert err.problem_count == 1 and "has zero width" in err.problems[0]


def test_clean_masks_give_neither_error_nor_warning(tmp_path):
    ds = load_coco(*make_coco(tmp_path, segmentation="mixed"))
    assert ds.mask_problems == () and ds.mask_error() is None and ds.mask_warning() is None


def test_huge_integers_are_one_line_errors(tmp_path):
    def spoil(d):
        d["annotations"][1]["bbox"] = [0, 0, 10**400, 3]
        d["annotations"][2]["segmentation"] = [[0, 0, 10**400, 0, 3, 3]]
        d["annotations"][3]["segmentation"] = {"size": [80, 96], "counts": [10**30, 5]}

    ann, img_dir = make_coco(tmp_path, segmentation="polygon", mutate=spoil)
    err = _error(lambda: load_coco(ann, img_dir))
    assert err.problem_count == 1, err.problems
    assert "'bbox' " in err.problems[0] and err.problems[0].endswith("is not finite")
    d = read_coco(ann)
    d["annotations"][1]["bbox"] = [0, 0, 3, 3]
    ann.write_text(json.dumps(d))
    masks = load_coco(ann, img_dir).mask_problems
    assert "polygon 0" in masks[0] and "is not finite" in masks[0]
    assert "RLE 'counts'" in masks[1] and len(masks) == 2
