"""The built-in example: real handwritten digits on a canvas, with known, recorded label errors.

`make_digits_example` draws 1-4 of the 8x8 handwritten digits scikit-learn ships
(`sklearn.datasets.load_digits`, values 0..16) on each image, upscaled to 19-31 % of the image
side, bright on a dark noisy background, never overlapping. The ground truth is exact: each box is
the tight box of the drawn pixels (COCO ``[x, y, w, h]`` in pixel edges, so the box covers columns
``x .. x + w - 1``). Categories are the ten digits, COCO ids 1..10 named "0".."9".

Then a known set of label errors is injected into a copy of the annotations, one error in each of
about ``corrupt_fraction`` of the images, the kinds in equal shares:

    swapped   the box keeps its place, its category becomes another digit
    missing   the box is removed (an overlooked object); images with 2+ boxes are picked first
    shifted   the box moves by 50-70 % of its width and of its height (IoU with the truth < 0.2)

Files written under ``out_dir`` (each atomically; ``annotations.json`` last):

    images/digits_0001.png ...   RGB PNGs, image_size x image_size
    annotations_clean.json        the ground truth (COCO)
    injected_errors.json          one record per injected error (see `_error_record`)
    annotations.json              the corrupted labels: what the pipeline runs on

The same arguments always give the same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .._exceptions import ConfigError
from ..storage._atomic import atomic_path, write_json

ERROR_KINDS: tuple[str, ...] = ("swapped", "missing", "shifted")

#: What `kfold-ray example` trains: the ``tiny`` preset for ``max_iter`` iterations (benchmarks
#: reuse it, so that "the example's budget" means exactly what the README command runs).
EXAMPLE_MODEL = "tiny"
EXAMPLE_MAX_ITER = 150


def example_overrides(max_iter: int = EXAMPLE_MAX_ITER) -> list[str]:
    """Detectron2 overrides of the example's training: the schedule, its LR step at 80 %."""
    return ["SOLVER.MAX_ITER", str(max_iter), "SOLVER.STEPS", f"({int(max_iter * 0.8)},)"]

_MAX_DIGITS = 4
_MIN_SIDE, _MAX_SIDE = 0.19, 0.31  # digit size, as a fraction of the image side
_INK_THRESHOLD = 0.4  # upscaled ink below this fraction of full is not drawn at all
_GAP = 2  # pixels kept free between digits
_PLACE_TRIES = 60


@dataclass(frozen=True)
class ExampleDataset:
    """Where `make_digits_example` wrote the example.

    Attributes:
        annotations_path: COCO json with the injected errors: the labels the pipeline runs on.
        image_dir: folder the json's ``file_name`` entries are relative to.
        injected_errors_path: json list of the injected errors (the answer key).
        clean_annotations_path: COCO json of the true labels.
    """

    annotations_path: Path
    image_dir: Path
    injected_errors_path: Path
    clean_annotations_path: Path


def make_digits_example(
    out_dir: str | Path,
    *,
    n_images: int = 150,
    image_size: int = 128,
    seed: int = 0,
    corrupt_fraction: float = 0.1,
) -> ExampleDataset:
    """Write the digits example dataset under ``out_dir`` and return its paths.

    Args:
        out_dir: folder to write into (created if missing; files of the same names are replaced).
        n_images: number of images, >= 1.
        image_size: side of the square images in pixels, >= 32.
        seed: the whole dataset (images, labels, errors) is a function of the arguments.
        corrupt_fraction: share of images that get one injected label error, in [0, 1];
            ``round(corrupt_fraction * n_images)`` images are corrupted.

    Raises:
        ConfigError: an argument is out of range.
    """
    if isinstance(n_images, bool) or not isinstance(n_images, int) or n_images < 1:
        raise ConfigError(f"n_images must be an integer >= 1, got {n_images!r}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 32:
        raise ConfigError(f"image_size must be an integer >= 32 (pixels), got {image_size!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"seed must be an integer >= 0, got {seed!r}")
    if not (0.0 <= float(corrupt_fraction) <= 1.0):
        raise ConfigError(f"corrupt_fraction must be in [0, 1], got {corrupt_fraction!r}")
    return _make_digits_example(
        Path(out_dir), n_images, image_size, seed, float(corrupt_fraction)
    )


def _make_digits_example(
    out_dir: Path, n_images: int, image_size: int, seed: int, corrupt_fraction: float
) -> ExampleDataset:
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    glyphs = np.asarray(digits.images, dtype=np.float32) / 16.0  # (1797, 8, 8) in [0, 1]
    targets = np.asarray(digits.target, dtype=np.int64)

    rng = np.random.default_rng(seed)
    image_dir = out_dir / "images"
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for i in range(n_images):
        image_id = i + 1
        file_name = f"digits_{image_id:04d}.png"
        canvas, placed = _draw_image(rng, glyphs, targets, image_size)
        with atomic_path(image_dir / file_name) as tmp:
            Image.fromarray(canvas).save(tmp, format="PNG")
        images.append(
            {"id": image_id, "file_name": file_name, "width": image_size, "height": image_size}
        )
        for digit, bbox in placed:
            w, h = bbox[2], bbox[3]
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": digit + 1,
                    "bbox": bbox,
                    "area": w * h,
                    "iscrowd": 0,
                }
            )

    clean = _coco(images, annotations, "ground truth")
    corrupted_anns, errors = _inject_errors(rng, images, annotations, corrupt_fraction)
    corrupted = _coco(images, corrupted_anns, f"{len(errors)} injected label errors")

    paths = ExampleDataset(
        annotations_path=out_dir / "annotations.json",
        image_dir=image_dir,
        injected_errors_path=out_dir / "injected_errors.json",
        clean_annotations_path=out_dir / "annotations_clean.json",
    )
    write_json(paths.clean_annotations_path, clean)
    write_json(paths.injected_errors_path, errors)
    write_json(paths.annotations_path, corrupted)  # last: its presence means the set is whole
    return paths


# ---- drawing ------------------------------------------------------------------------------
def _draw_image(
    rng: np.random.Generator, glyphs: np.ndarray, targets: np.ndarray, size: int
) -> tuple[np.ndarray, list[tuple[int, list[int]]]]:
    """One canvas: uint8 (size, size, 3) and its [(digit, [x, y, w, h]), ...] in drawing order."""
    base = rng.uniform(10.0, 30.0)
    noise = rng.normal(0.0, 4.0, (size, size, 1)) + rng.normal(0.0, 2.0, (size, size, 3))
    canvas = base + noise
    lo, hi = max(8, round(_MIN_SIDE * size)), max(9, round(_MAX_SIDE * size))
    taken: list[tuple[int, int, int, int]] = []  # x0, y0, x1, y1 (exclusive) of tight boxes
    placed: list[tuple[int, list[int]]] = []
    for _ in range(int(rng.integers(1, _MAX_DIGITS + 1))):
        k = int(rng.integers(len(glyphs)))
        side = int(rng.integers(lo, hi + 1))
        ink = _upscale(glyphs[k], side)
        ys, xs = np.nonzero(ink)
        if len(xs) == 0:  # never happens with sklearn's digits; keeps the box well defined
            continue
        bx0, by0, bx1, by1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
        spot = _find_spot(rng, taken, size, bx1 - bx0, by1 - by0)
        if spot is None:
            continue
        x, y = spot
        ink = ink[by0:by1, bx0:bx1, None]
        color = rng.uniform(200.0, 255.0, size=3)
        region = canvas[y : y + (by1 - by0), x : x + (bx1 - bx0)]
        region[...] = region * (1.0 - ink) + color * ink
        taken.append((x, y, x + bx1 - bx0, y + by1 - by0))
        placed.append((int(targets[k]), [int(x), int(y), int(bx1 - bx0), int(by1 - by0)]))
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8), placed


def _upscale(glyph: np.ndarray, side: int) -> np.ndarray:
    """float32 (side, side) ink in [0, 1]: bilinear upscale, faint ink cut to exactly 0."""
    from PIL import Image

    big = np.asarray(
        Image.fromarray(glyph).resize((side, side), Image.BILINEAR), dtype=np.float32
    )
    big = np.clip(big / 0.75, 0.0, 1.0)  # full strokes reach full brightness
    big[big < _INK_THRESHOLD] = 0.0
    return big


def _find_spot(
    rng: np.random.Generator, taken: list[tuple[int, int, int, int]], size: int, w: int, h: int
) -> tuple[int, int] | None:
    """Top-left corner for a w x h box inside the image, _GAP away from every taken box."""
    for _ in range(_PLACE_TRIES):
        x, y = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
        if all(
            x + w + _GAP <= tx0 or tx1 + _GAP <= x or y + h + _GAP <= ty0 or ty1 + _GAP <= y
            for tx0, ty0, tx1, ty1 in taken
        ):
            return x, y
    return None


def _coco(images: list[dict], annotations: list[dict], description: str) -> dict[str, Any]:
    return {
        "info": {
            "description": f"kfold-ray digits example ({description}); digits from "
            "scikit-learn's load_digits (UCI optical recognition of handwritten digits)",
            "version": "1",
        },
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": d + 1, "name": str(d), "supercategory": "digit"} for d in range(10)
        ],
    }


# ---- label errors ---------------------------------------------------------------------------
def _inject_errors(
    rng: np.random.Generator,
    images: list[dict[str, Any]],
    annotations: list[dict[str, Any]],
    corrupt_fraction: float,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(corrupted copy of ``annotations``, error records sorted by image id)."""
    by_image: dict[int, list[int]] = {}
    for row, ann in enumerate(annotations):
        by_image.setdefault(ann["image_id"], []).append(row)
    candidates = [im["id"] for im in images if by_image.get(im["id"])]
    n_corrupt = min(len(candidates), int(round(corrupt_fraction * len(images))))
    chosen = [candidates[j] for j in rng.permutation(len(candidates))[:n_corrupt]]
    kinds = [ERROR_KINDS[j % len(ERROR_KINDS)] for j in range(n_corrupt)]
    n_missing = kinds.count("missing")
    # "missing" goes to images with other boxes left when there are enough of them.
    chosen.sort(key=lambda image_id: len(by_image[image_id]) < 2)  # stable: keeps the shuffle
    assignment = list(zip(chosen[:n_missing], ["missing"] * n_missing))
    others = [k for k in kinds if k != "missing"]
    assignment += list(zip(chosen[n_missing:], others))

    size_of = {im["id"]: (im["width"], im["height"]) for im in images}
    name_of = {im["id"]: im["file_name"] for im in images}
    corrupted = [dict(ann) for ann in annotations]
    dropped: set[int] = set()
    errors: list[dict[str, Any]] = []
    for image_id, kind in sorted(assignment):
        rows = by_image[image_id]
        row = rows[int(rng.integers(len(rows)))]
        ann = corrupted[row]
        new_bbox: list[int] | None = list(ann["bbox"])
        new_cat: int | None = ann["category_id"]
        if kind == "swapped":
            new_cat = (ann["category_id"] - 1 + int(rng.integers(1, 10))) % 10 + 1
            ann["category_id"] = new_cat
        elif kind == "shifted":
            new_bbox = _shift(rng, ann["bbox"], *size_of[image_id])
            ann["bbox"] = new_bbox
        else:
            dropped.add(row)
        if kind == "missing":
            new_bbox, new_cat = None, None
        errors.append(
            _error_record(image_id, name_of[image_id], kind, annotations[row], new_bbox, new_cat)
        )
    return [a for r, a in enumerate(corrupted) if r not in dropped], errors


def _shift(rng: np.random.Generator, bbox: list[int], width: int, height: int) -> list[int]:
    """The box moved by 50-70 % of its size along both axes, kept inside the image."""
    x, y, w, h = bbox
    out = [x, y]
    for axis, (pos, extent, limit) in enumerate(((x, w, width), (y, h, height))):
        step = max(1, int(round(extent * rng.uniform(0.5, 0.7))))
        sign = 1 if rng.random() < 0.5 else -1
        if not 0 <= pos + sign * step <= limit - extent:
            sign = -sign
        out[axis] = int(np.clip(pos + sign * step, 0, limit - extent))
    return [out[0], out[1], w, h]


def _error_record(
    image_id: int,
    file_name: str,
    kind: str,
    original: dict[str, Any],
    bbox: list[int] | None,
    category_id: int | None,
) -> dict[str, Any]:
    """One line of injected_errors.json. ``corrupted_*`` are null for a "missing" box."""
    return {
        "image_id": image_id,
        "file_name": file_name,
        "kind": kind,
        "annotation_id": original["id"],
        "original_bbox": list(original["bbox"]),
        "original_category_id": original["category_id"],
        "corrupted_bbox": bbox,
        "corrupted_category_id": category_id,
    }
