"""Label-error signals on a finished example run: out-of-fold loss inspection vs cleanlab.

    .venv/bin/kfold-ray example --run-dir runs/example     # the README's main command (CPU: ~8 min)
    .venv/bin/kfold-ray report runs/example                # cleanlab's ranking (label_issues.parquet)
    .venv/bin/python benchmarks/bench_loss_signals.py runs/example

The digits example records its injected label errors (`runs/example-data/injected_errors.json`:
5 missing boxes, 5 swapped classes, 5 shifted boxes among 150 images). Each image gets a score
from each signal; AUROC (corrupted vs clean images) and precision among the N worst (N = number
of corrupted images) say how well a signal finds them:

    box losses        per image, the max over its given boxes of loss_cls + loss_box_reg from
                      box_losses.parquet (the fold model that never trained on the image scores
                      each given box): sees swapped classes and shifted boxes, not missing ones
    overlooked        the best score of a prediction that overlaps no given box (IoU < 0.5): sees
                      missing boxes
    max of ranks      each image's worse (higher) rank of the two, as a fraction: no weights to tune
    cleanlab          1 - cleanlab's label quality score (what `kfold-ray report` ranks by today)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from sklearn.metrics import roc_auc_score


def _per_image(table, ids: np.ndarray, column: str, how: str) -> np.ndarray:
    s = table.groupby("image_id")[column].agg(how)
    return s.reindex(ids, fill_value=0.0).to_numpy(dtype=float)


def _iou(box: np.ndarray, given: np.ndarray) -> np.ndarray:
    lo, hi = np.maximum(box[:2], given[:, :2]), np.minimum(box[2:], given[:, 2:])
    inter = np.clip(hi - lo, 0, None).prod(axis=1)
    area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])  # noqa: E731
    return inter / (area(box) + area(given) - inter)


def _overlooked(predictions, given: dict[int, np.ndarray], ids: np.ndarray) -> np.ndarray:
    best = {}
    for image_id, rows in predictions.groupby("image_id"):
        boxes = rows[["x1", "y1", "x2", "y2"]].to_numpy()
        g = given.get(image_id)
        unmatched = [s for b, s in zip(boxes, rows["score"]) if g is None or _iou(b, g).max() < 0.5]
        best[image_id] = max(unmatched, default=0.0)
    return np.array([best.get(i, 0.0) for i in ids])


def _rank01(x: np.ndarray) -> np.ndarray:
    return np.argsort(np.argsort(x, kind="stable"), kind="stable") / (len(x) - 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--data", type=Path, default=None, help="default: <run_dir>-data")
    args = ap.parse_args()
    data = args.data or args.run_dir.with_name(args.run_dir.name + "-data")
    doc = json.loads((data / "annotations.json").read_text())
    ids = np.array([im["id"] for im in doc["images"]])
    bad = {e["image_id"] for e in json.loads((data / "injected_errors.json").read_text())}
    y = np.isin(ids, list(bad))
    given: dict[int, list] = {}
    for a in doc["annotations"]:
        x, top, w, h = a["bbox"]
        given.setdefault(a["image_id"], []).append([x, top, x + w, top + h])
    given = {k: np.asarray(v, dtype=float) for k, v in given.items()}
    losses = pq.read_table(args.run_dir / "box_losses.parquet").to_pandas()
    box = _per_image(losses, ids, "loss_cls", "max") + _per_image(losses, ids, "loss_box_reg", "max")
    over = _overlooked(pq.read_table(args.run_dir / "predictions.parquet").to_pandas(), given, ids)
    signals = {"box losses": box, "overlooked": over,
               "max of ranks (box losses, overlooked)": np.maximum(_rank01(box), _rank01(over))}
    issues = args.run_dir / "label_issues.parquet"
    if issues.is_file():
        q = pq.read_table(issues).to_pandas().set_index("image_id")["quality_score"]
        signals["cleanlab (1 - quality)"] = 1 - q.reindex(ids).to_numpy()
    n = int(y.sum())
    print(f"{len(ids)} images, {n} with an injected error")
    print(f"{'signal':<40} {'AUROC':>6} {'P@' + str(n):>6}")
    for name, score in signals.items():
        top = np.argsort(-score, kind="stable")[:n]
        print(f"{name:<40} {roc_auc_score(y, score):>6.3f} {y[top].mean():>6.3f}")


if __name__ == "__main__":
    main()
