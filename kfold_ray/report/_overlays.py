"""The report's overlays: a suspect image with its given and predicted boxes, drawn with PIL.

Given boxes solid green, out-of-fold predicted boxes dashed orange (those scoring at least
`PRED_MIN_SCORE`, and every prediction the ranking refers to), the boxes concerned in red
(thicker), each with its class name (and score). Images are drawn at `OVERLAY_SIDE` px on their
long side.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from ..storage._atomic import atomic_path

__all__ = ["CONCERNED", "GIVEN", "PREDICTED", "PRED_MIN_SCORE", "draw_overlay"]

OVERLAY_SIDE = 512
PRED_MIN_SCORE = 0.5  # cleanlab's own low-probability threshold (badly-located boxes)
GIVEN = (0, 200, 0)
PREDICTED = (255, 140, 0)
CONCERNED = (230, 0, 40)
HALO = (0, 0, 0)
CROWD = (170, 170, 170)
DIM = 0.35  # the image is darkened by this much under the overlay


# ---- overlays -----------------------------------------------------------------------------------------
def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def _load_image(dataset, index: int):
    """The image as RGB, EXIF-rotated as Detectron2 reads it; a grey canvas if it cannot be read.

    Read through the image root's filesystem: a local folder or a URI (``s3://...``)."""
    import io

    from PIL import Image, ImageOps

    from ..data._dataset import read_image_bytes

    try:
        with Image.open(io.BytesIO(read_image_bytes(dataset, index))) as im:
            return ImageOps.exif_transpose(im).convert("RGB"), True
    except (OSError, ValueError):  # pyarrow's errors are OSErrors / ValueErrors too
        size = (int(dataset.widths[index]), int(dataset.heights[index]))
        return Image.new("RGB", size, (90, 90, 90)), False


def draw_overlay(path: Path, dataset, suspect: dict[str, Any],
                  det: dict[str, np.ndarray] | None) -> None:
    from PIL import Image, ImageDraw

    image, readable = _load_image(dataset, suspect["image_index"])
    scale = OVERLAY_SIDE / max(image.size)
    size = (max(1, round(image.size[0] * scale)), max(1, round(image.size[1] * scale)))
    image = image.resize(size, Image.NEAREST if scale >= 2 else Image.BILINEAR)
    image = Image.blend(image, Image.new("RGB", image.size, (0, 0, 0)), DIM)
    pen = ImageDraw.Draw(image)
    font = _font(max(11, OVERLAY_SIDE // 40))
    concerned = json.loads(suspect["boxes"])
    _draw_given(pen, image.size, scale, font, dataset, suspect["image_index"],
                {b["annotation_id"] for b in concerned if b["source"] == "given"})
    if det is not None:
        hits = [b["bbox"] for b in concerned if b["source"] == "predicted"]
        hits += [b["predicted"]["bbox"] for b in concerned if b.get("predicted")]
        _draw_predicted(pen, image.size, scale, font, dataset.class_names, det, hits)
    if not readable:
        pen.text((6, 6), "image file could not be read", fill=(255, 255, 255), font=font)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def _draw_given(pen, size, scale: float, font, dataset, index: int, concerned: set[int]) -> None:
    """Given boxes: solid; the concerned ones red and thicker; crowd boxes thin grey."""
    boxes, classes, crowd = dataset.annotations_of(index)
    lo = int(dataset.ann_offsets[index])
    for j, (box, c, is_crowd) in enumerate(zip(boxes, classes, crowd)):
        name = dataset.class_names[int(c)]
        if is_crowd:
            _rect(pen, box * scale, CROWD, width=1, dashed=False)
            _tag(pen, size, box * scale, f"{name} (crowd)", CROWD, font, below=False)
            continue
        hit = int(dataset.ann_ids[lo + j]) in concerned
        colour = CONCERNED if hit else GIVEN
        _rect(pen, box * scale, colour, width=4 if hit else 2, dashed=False)
        _tag(pen, size, box * scale, name, colour, font, below=False)


def _draw_predicted(pen, size, scale: float, font, names: list[str], det: dict[str, np.ndarray],
                    concerned: list[list[float]]) -> None:
    """Predicted boxes scoring >= PRED_MIN_SCORE, and the concerned ones: dashed."""
    for box, c, s in zip(det["boxes"], det["classes"], det["scores"]):
        hit = any(np.allclose(box, b, atol=0.01) for b in concerned)
        if s < PRED_MIN_SCORE and not hit:
            continue
        colour = CONCERNED if hit else PREDICTED
        _rect(pen, box * scale, colour, width=4 if hit else 2, dashed=True)
        _tag(pen, size, box * scale, f"{names[int(c)]} {s:.2f}", colour, font, below=True)


def _rect(pen, box: np.ndarray, colour, *, width: int, dashed: bool) -> None:
    """A box outline with a dark halo, so that it stands out on any image content."""
    x1, y1, x2, y2 = (float(v) for v in box)
    if not dashed:
        pen.rectangle([x1 - 1, y1 - 1, x2 + 1, y2 + 1], outline=HALO, width=width + 2)
        pen.rectangle([x1, y1, x2, y2], outline=colour, width=width)
        return
    for a, b in (((x1, y1), (x2, y1)), ((x2, y1), (x2, y2)), ((x2, y2), (x1, y2)), ((x1, y2), (x1, y1))):
        _dashed_line(pen, a, b, colour, width)


def _dashed_line(pen, a, b, colour, width: int, dash: float = 9.0, gap: float = 6.0) -> None:
    length = math.hypot(b[0] - a[0], b[1] - a[1])
    if length == 0:
        return
    ux, uy = (b[0] - a[0]) / length, (b[1] - a[1]) / length
    t = 0.0
    while t < length:
        end = min(t + dash, length)
        segment = [(a[0] + ux * t, a[1] + uy * t), (a[0] + ux * end, a[1] + uy * end)]
        pen.line(segment, fill=HALO, width=width + 2)
        pen.line(segment, fill=colour, width=width)
        t = end + gap


def _tag(pen, size: tuple[int, int], box: np.ndarray, text: str, colour, font, *, below: bool) -> None:
    """A class name (and score) on a filled strip just above (given) or below (predicted) a box."""
    x1, y1, _, y2 = (float(v) for v in box)
    left, top, right, bottom = pen.textbbox((0, 0), text, font=font)
    w, h = right - left + 4, bottom - top + 4
    width, height = size
    x = min(max(0.0, x1), max(0.0, width - w))
    y = y2 + 1 if below else y1 - h - 1
    y = min(max(0.0, y), max(0.0, height - h))
    pen.rectangle([x, y, x + w, y + h], fill=colour)
    ink = (0, 0, 0) if colour in (GIVEN, CROWD) else (255, 255, 255)
    pen.text((x + 2 - left, y + 2 - top), text, fill=ink, font=font)


