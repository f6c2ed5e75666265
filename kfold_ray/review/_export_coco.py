"""The suspects as a COCO subset: what CVAT imports as "COCO 1.0" (and any COCO tool reads).

The images and the annotations are the dataset's own records, copied as they are (every field,
every id): a tool that keeps ids lets `_apply` match the corrected boxes back by id, one that
renumbers them (CVAT does) by file name and overlap. ``categories``, ``info`` and ``licenses``
are the dataset's. A top-level ``kfold_ray`` object (ignored by COCO readers) lists each
suspect's rank, kind and scores, worst first. Images keep the ranking's order.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from ._coco_document import read_coco_document, write_json_file
from ._suspects import Suspect

__all__ = ["write_coco_subset"]


def write_coco_subset(annotations: str, suspects: Sequence[Suspect], out: str | os.PathLike[str],
                      *, run: str = "") -> Path:
    """Write the COCO subset of ``suspects`` (copied from the json at ``annotations``) to ``out``.

    Returns the path written.
    """
    doc, _ = read_coco_document(annotations)
    wanted = [s.image_id for s in suspects]
    images = {int(r["id"]): r for r in doc["images"]}
    by_image: dict[int, list[dict[str, Any]]] = {i: [] for i in wanted}
    for a in doc["annotations"]:
        if int(a["image_id"]) in by_image:
            by_image[int(a["image_id"])].append(a)
    subset: dict[str, Any] = {k: v for k, v in doc.items() if k not in ("images", "annotations")}
    subset["images"] = [images[i] for i in wanted]
    subset["annotations"] = [a for i in wanted for a in by_image[i]]
    subset["kfold_ray"] = {
        "run": run,
        "what": "suspected label errors, worst first; the images and annotations are the "
                "dataset's own records (ids kept)",
        "suspects": [{"image_id": s.image_id, "rank": s.rank, "issue_kind": s.issue_kind,
                      "fold": s.fold, **s.scores} for s in suspects],
    }
    return write_json_file(out, subset)
