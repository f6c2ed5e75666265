"""Label errors injected and scored after Schubert et al. 2023 (arXiv 2303.06999, their
``simulate_label_errors.py``), for `bench_label_errors.py`.

Injection (`inject_errors`), of all given (non-crowd) boxes 5 % each, a box getting at most one:

    DROP    the box is removed                                  (we name it "overlooked")
    FLIP    its class becomes another class, drawn uniformly    ("swapped")
    SHIFT   width, height and centre each jittered by a normal with sigma 15 % of the box's size,
            redrawn (up to 200 tries) until its IoU with the true box is in [0.4, 0.7) and it
            stays inside the image; a box that never gets there is left alone and the next
            candidate box is tried                              ("badly_located")
    SPAWN   a copy of a true box (its class and size) is added to another image drawn at random,
            at a uniformly random position inside it            ("spurious")

Scoring (`score_boxes`, `score_images`), from a finished run's per-box ranking (box_issues) and
per-image ranking (label_issues):

    per box     positives: the corrupted given boxes of a kind; negatives: every given box that was
                not corrupted (on real data its own errors are among them). A DROP is scored by
                the best unmatched prediction covering the dropped box (IoU >= 0.5; none: the
                lowest score), against the unmatched predictions that cover no dropped box
    per image   positives: the images with an error of that kind; negatives: images without any
    AUROC       with a bootstrap 95 % interval (positives and negatives resampled separately)
    P@N         precision among the N worst rows (N = number of positives of every kind)
    confusion   the kind the ranking names on each corrupted box against the kind injected
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np

#: Protocol kind -> the kind kfold-ray names (label_issues.issue_kind / box_issues.kind), and the
#: ``kind`` written to injected_errors.json (the names the report page knows).
NAMED = {"drop": "overlooked", "flip": "swapped", "shift": "badly_located", "spawn": "spurious"}
RECORD_KIND = {"drop": "missing", "flip": "swapped", "shift": "shifted", "spawn": "spurious"}
PROTOCOL_KINDS = tuple(NAMED)
SHARE = 0.05
SHIFT_SIGMA = 0.15
SHIFT_IOU = (0.4, 0.7)
SHIFT_TRIES = 200
COVER_IOU = 0.5


# ---- injection ------------------------------------------------------------------------------------
def inject_errors(coco: dict[str, Any], seed: int, share: float = SHARE
                  ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(corrupted copy of the COCO dict, one record per injected error), both deterministic in
    ``seed``. Records: ``image_id``, ``file_name``, ``kind`` (missing/swapped/shifted/spurious),
    ``protocol_kind`` (drop/flip/shift/spawn), ``annotation_id`` (the corrupted or added one; the
    removed one for a drop), ``original_bbox``/``original_category_id`` (null for a spawn),
    ``corrupted_bbox``/``corrupted_category_id`` (null for a drop), and for a spawn
    ``source_annotation_id``."""
    rng = np.random.default_rng(seed)
    out = copy.deepcopy(coco)
    anns = out["annotations"]
    images = {im["id"]: im for im in out["images"]}
    cat_ids = sorted(c["id"] for c in out["categories"])
    candidates = [i for i, a in enumerate(anns) if not a.get("iscrowd", 0)]
    n_each = int(round(share * len(candidates)))
    pool = [candidates[j] for j in rng.permutation(len(candidates))]
    taken: set[int] = set()
    records: list[dict[str, Any]] = []
    next_id = max((a["id"] for a in anns), default=0) + 1
    for kind in PROTOCOL_KINDS:
        done = 0
        for row in pool:
            if done == n_each:
                break
            if row in taken:
                continue
            ann = anns[row]
            im = images[ann["image_id"]]
            if kind == "shift":
                box = _shifted(rng, ann["bbox"], im["width"], im["height"])
                if box is None:
                    continue
                records.append(_record(im, kind, ann, ann["id"], box, ann["category_id"]))
                ann["bbox"], ann["area"] = box, box[2] * box[3]
            elif kind == "flip":
                new = int(rng.choice([c for c in cat_ids if c != ann["category_id"]]))
                records.append(_record(im, kind, ann, ann["id"], ann["bbox"], new))
                ann["category_id"] = new
            elif kind == "drop":
                records.append(_record(im, kind, ann, ann["id"], None, None))
            else:  # spawn: a copy of this (true, kept) box in another image
                others = [i for i in images if i != ann["image_id"]]
                target = images[others[int(rng.integers(len(others)))]]
                w = min(float(ann["bbox"][2]), float(target["width"]))
                h = min(float(ann["bbox"][3]), float(target["height"]))
                x = float(rng.uniform(0, target["width"] - w))
                y = float(rng.uniform(0, target["height"] - h))
                box = [round(x, 2), round(y, 2), w, h]
                new_ann = {"id": next_id, "image_id": target["id"], "category_id": ann["category_id"],
                           "bbox": box, "area": w * h, "iscrowd": 0}
                rec = _record(target, kind, None, next_id, box, ann["category_id"])
                rec["source_annotation_id"] = ann["id"]
                records.append(rec)
                anns.append(new_ann)
                next_id += 1
            taken.add(row)
            done += 1
    dropped = {r["annotation_id"] for r in records if r["protocol_kind"] == "drop"}
    out["annotations"] = [a for a in anns if a["id"] not in dropped]
    records.sort(key=lambda r: (r["image_id"], r["annotation_id"]))
    return out, records


def _shifted(rng: np.random.Generator, bbox: list[float], width: float, height: float
             ) -> list[float] | None:
    x, y, w, h = map(float, bbox)
    cx, cy = x + w / 2, y + h / 2
    for _ in range(SHIFT_TRIES):
        nw = w * (1 + rng.normal(0, SHIFT_SIGMA))
        nh = h * (1 + rng.normal(0, SHIFT_SIGMA))
        ncx, ncy = cx + rng.normal(0, SHIFT_SIGMA * w), cy + rng.normal(0, SHIFT_SIGMA * h)
        box = [ncx - nw / 2, ncy - nh / 2, nw, nh]
        if nw <= 1 or nh <= 1 or box[0] < 0 or box[1] < 0 or box[0] + nw > width or box[1] + nh > height:
            continue
        if SHIFT_IOU[0] <= xywh_iou(box, [x, y, w, h]) < SHIFT_IOU[1]:
            return [round(v, 2) for v in box]
    return None


def xywh_iou(a: list[float], b: list[float]) -> float:
    ix = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0


def _record(im: dict, kind: str, original: dict | None, ann_id: int, bbox, category_id) -> dict:
    return {"image_id": im["id"], "file_name": im["file_name"], "kind": RECORD_KIND[kind],
            "protocol_kind": kind, "annotation_id": ann_id,
            "original_bbox": None if original is None else list(original["bbox"]),
            "original_category_id": None if original is None else original["category_id"],
            "corrupted_bbox": None if bbox is None else list(bbox),
            "corrupted_category_id": category_id}
