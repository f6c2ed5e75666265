"""Small, real COCO detection datasets for tests: a json and PNG images that a detector can learn.

Each box is drawn as a filled rectangle in its class's colour on a plain grey background, so
class and position can be learnt from a few images.

    ann, img_dir = make_coco(tmp_path)                       # 12 images, 3 classes
    ann, img_dir = make_coco(tmp_path, awkward=True)         # the awkward cases, see make_coco
    ann, _ = make_coco(tmp_path, mutate=lambda d: d["images"].pop())
    edit_coco(ann, lambda d: d["annotations"][0].update(bbox=[0, 0, -4, 3]))
    ann, img_dir = make_coco(tmp_path, segmentation="polygon")   # masks too: see SEGMENTATIONS
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw

#: Fill colour of class index c is PALETTE[c % len(PALETTE)]; the background is BACKGROUND.
PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (0, 0, 128), (128, 128, 0)]  # fmt: skip
BACKGROUND = (128, 128, 128)
AWKWARD_SIZES = [(96, 80), (80, 96), (112, 64), (64, 64)]
AWKWARD_NAME = "sub dir/bild_ä_ø.png"  # non-ASCII, with a space, in a subfolder

Size = tuple[int, int]
#: ``segmentation=`` kinds: each annotation's mask is its box, as a polygon (its 4 corners), an
#: uncompressed RLE (``counts`` a list of run lengths), a compressed RLE (``counts`` a string, as
#: pycocotools writes it), or the three in turn ("mixed"). Crowd boxes always get an RLE.
SEGMENTATIONS = ("polygon", "rle", "rle-string", "mixed")


def make_coco(
    root: Path,
    *,
    n_images: int = 12,
    size: Size | Sequence[Size] = (96, 80),
    categories: int | Sequence[str] = 3,
    boxes_per_image: tuple[int, int] = (1, 3),
    seed: int = 0,
    awkward: bool = False,
    segmentation: str | None = None,
    mutate: Callable[[dict[str, Any]], Any] | None = None,
    **overrides: Any,
) -> tuple[Path, Path]:
    """Write ``root/annotations.json`` and PNGs under ``root/images``; return (json, image dir).

    ``size`` is (width, height), one for all images or one per image. ``categories``: how many,
    or their names; ids are 1, 2, 3, ... Every image gets a ``video_id`` field (``i // 3``).

    ``awkward=True`` adds: category ids 3, 7, 11, ... (not contiguous); image ids 1000 - 7 * i
    listed in an order unlike id order; the image at position 1 has no boxes; the first box of the
    image at position 2 is a crowd box; mixed image sizes (unless ``size`` gives them); the image
    at position 3 is ``AWKWARD_NAME`` (non-ASCII, in a subfolder). Use ``n_images >= 8`` for all
    of them.

    The json is written with the images' true sizes first, then ``mutate(doc)`` runs on the dict,
    then each ``overrides`` key replaces that top-level field; the result is what is written.
    Image files are drawn from the unmutated dataset.

    ``segmentation`` (one of `SEGMENTATIONS`): give every annotation a ``segmentation`` that is
    its box (default: none).
    """
    doc = coco_dict(n_images=n_images, size=size, categories=categories,
                    boxes_per_image=boxes_per_image, seed=seed, awkward=awkward,
                    segmentation=segmentation)  # fmt: skip
    image_dir = Path(root) / "images"
    draw_images(doc, image_dir)
    if mutate is not None:
        mutate(doc)
    doc.update(overrides)
    ann = Path(root) / "annotations.json"
    write_coco(ann, doc)
    return ann, image_dir


def coco_dict(
    *,
    n_images: int = 12,
    size: Size | Sequence[Size] = (96, 80),
    categories: int | Sequence[str] = 3,
    boxes_per_image: tuple[int, int] = (1, 3),
    seed: int = 0,
    awkward: bool = False,
    segmentation: str | None = None,
) -> dict[str, Any]:
    """The COCO dict `make_coco` writes (file names relative to its image dir), no files."""
    if segmentation is not None and segmentation not in SEGMENTATIONS:
        raise ValueError(f"segmentation must be one of {SEGMENTATIONS} or None, got {segmentation!r}")
    rng = np.random.default_rng(seed)
    if isinstance(categories, int):
        names = [f"class_{c}" for c in range(categories)]
    else:
        names = list(categories)
    step, first = (4, 3) if awkward else (1, 1)
    cat_ids = [first + step * c for c in range(len(names))]
    sizes = _sizes(size, n_images, awkward)
    images, annotations = [], []
    for i in range(n_images):
        image_id = 1000 - 7 * i if awkward else i + 1
        name = AWKWARD_NAME if awkward and i == 3 else f"img_{i:05d}.png"
        w, h = sizes[i]
        images.append(
            {"id": image_id, "file_name": name, "width": w, "height": h, "video_id": i // 3}
        )
        n_boxes = int(rng.integers(boxes_per_image[0], boxes_per_image[1] + 1))
        if awkward and i == 1:
            n_boxes = 0
        for b in range(n_boxes):
            cls = int(rng.integers(len(names)))
            bw, bh = int(rng.integers(w // 6, w // 2)), int(rng.integers(h // 6, h // 2))
            x, y = int(rng.integers(0, w - bw + 1)), int(rng.integers(0, h - bh + 1))
            annotations.append({
                "id": 5000 + len(annotations) * 3 if awkward else len(annotations) + 1,
                "image_id": image_id, "category_id": cat_ids[cls],
                "bbox": [x, y, bw, bh], "area": bw * bh,
                "iscrowd": 1 if awkward and i == 2 and b == 0 else 0,
            })  # fmt: skip
    if segmentation is not None:
        size_of = {im["id"]: (im["width"], im["height"]) for im in images}
        for k, a in enumerate(annotations):
            kind = SEGMENTATIONS[k % 3] if segmentation == "mixed" else segmentation
            if a["iscrowd"] and kind == "polygon":
                kind = "rle"
            a["segmentation"] = box_segmentation(a["bbox"], *size_of[a["image_id"]], kind)
    if awkward and n_images > 7:  # ids already fall along the list; break the pattern too
        images[4], images[7] = images[7], images[4]
    cats = [{"id": cid, "name": n, "supercategory": "shape"} for cid, n in zip(cat_ids, names)]
    return {"info": {"description": "cocofactory"}, "images": images,
            "annotations": annotations, "categories": cats}  # fmt: skip


def box_segmentation(bbox: Sequence[int], width: int, height: int, kind: str = "polygon") -> Any:
    """The mask of an integer box ``[x, y, w, h]`` in an image of ``width`` x ``height``, as COCO
    writes it: ``"polygon"`` (its 4 corners), ``"rle"`` or ``"rle-string"`` (see `SEGMENTATIONS`)."""
    x, y, w, h = (int(v) for v in bbox)
    if kind == "polygon":
        return [[x, y, x + w, y, x + w, y + h, x, y + h]]
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[y : y + h, x : x + w] = 1
    counts = rle_counts(mask)
    return {"size": [height, width], "counts": rle_string(counts) if kind == "rle-string" else counts}


def rle_counts(mask: np.ndarray) -> list[int]:
    """COCO's uncompressed RLE of a 2-D 0/1 mask: run lengths in column-major order, zeros first."""
    flat = np.asarray(mask, dtype=np.uint8).flatten(order="F")
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    return [0, *runs] if flat.size and flat[0] else runs


def rle_string(counts: Sequence[int]) -> str:
    """pycocotools' compressed form of run lengths (``rleToString``)."""
    out = []
    for i, value in enumerate(counts):
        x = int(value) - (int(counts[i - 2]) if i > 2 else 0)
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = x != -1 if c & 0x10 else x != 0
            out.append(chr((c | 0x20 if more else c) + 48))
    return "".join(out)


def _sizes(size: Size | Sequence[Size], n: int, awkward: bool) -> list[Size]:
    if len(size) == 2 and all(isinstance(v, int) for v in size):
        one = (int(size[0]), int(size[1]))  # type: ignore[arg-type]
        return [AWKWARD_SIZES[i % len(AWKWARD_SIZES)] for i in range(n)] if awkward else [one] * n
    sizes = [(int(w), int(h)) for w, h in size]  # type: ignore[misc]
    if len(sizes) != n:
        raise ValueError(f"size gives {len(sizes)} sizes for {n} images")
    return sizes


def draw_images(doc: dict[str, Any], image_dir: Path) -> None:
    """Draw every image of ``doc``: boxes filled in their class colour on a grey background."""
    cat_rank = {c["id"]: r for r, c in enumerate(sorted(doc["categories"], key=lambda c: c["id"]))}
    by_image: dict[int, list[dict[str, Any]]] = {}
    for a in doc["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    for img in doc["images"]:
        im = Image.new("RGB", (img["width"], img["height"]), BACKGROUND)
        pen = ImageDraw.Draw(im)
        for a in by_image.get(img["id"], []):
            x, y, w, h = a["bbox"]
            colour = PALETTE[cat_rank[a["category_id"]] % len(PALETTE)]
            pen.rectangle([x, y, x + w - 1, y + h - 1], fill=colour)
        path = image_dir / img["file_name"]
        path.parent.mkdir(parents=True, exist_ok=True)
        im.save(path)


def read_coco(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def write_coco(path: Path, doc: Any) -> None:
    """Write ``doc`` as json (NaN/Infinity allowed, so bad-input tests can write them)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(doc, ensure_ascii=False), encoding="utf-8")


def edit_coco(path: Path, mutate: Callable[[dict[str, Any]], Any]) -> dict[str, Any]:
    """Read the json at ``path``, apply ``mutate`` to it in place, write it back; return it."""
    doc = read_coco(path)
    mutate(doc)
    write_coco(path, doc)
    return doc


def upload_tree(local: Path, uri: str) -> str:
    """Copy the folder ``local`` (e.g. a `make_coco` root) to ``uri`` (``s3://bucket/prefix``)
    through ``pyarrow.fs``, keeping relative names; return ``uri``."""
    import pyarrow.fs as pafs

    dest, prefix = pafs.FileSystem.from_uri(uri)
    pafs.copy_files(str(local), prefix, source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=dest)  # fmt: skip
    return uri.rstrip("/")
