"""Reducer + output writers at COCO-train scale, versus the seed notebook's per-detection loop.

    python benchmarks/bench_reducer.py                  # 118,287 images x 100 boxes, 80 classes, k=5
    python benchmarks/bench_reducer.py --images 20000   # smaller
    python benchmarks/bench_reducer.py --metrics-images 2000

Synthetic data: every image gets ``--detections`` boxes with uniformly random classes (the worst
case for the cleanlab pickle: ~57 of 80 classes non-empty per image) and ~7.3 ground-truth boxes.
Fold batches of ``--batch`` images are persisted as the driver would (`Reducer.add`); then a fresh
child process reads them back, stitches and writes every output, so its peak RSS (``ru_maxrss``) is
that of the reducer + writers alone.

The baseline does what users do by hand today after prediction (a notebook's loop): per image, a Python loop over
detections (``format_detectron2_predictions``, with numpy arrays standing in for CPU tensors: a
faster baseline than real tensors' ``.item()``), a dict of results per fold pickled per fold, merged
and reordered by hand into the final list. It runs on ``--baseline-images`` images; rates are per
image. Timings are ratios measured in one run, not pass/fail tests.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kfold_ray.data._dataset import Category, CocoDataset  # noqa: E402
from kfold_ray._schema import batch_fold, make_prediction_batch  # noqa: E402


def synthetic_dataset(n: int, classes: int, seed: int = 0) -> CocoDataset:
    rng = np.random.default_rng(seed)
    counts = rng.poisson(7.3, n)
    m = int(counts.sum())
    xy = rng.uniform(0, 500, (m, 2))
    wh = rng.uniform(4, 140, (m, 2))
    return CocoDataset(
        annotations_path=Path("synthetic.json"),
        image_root=Path("."),
        image_ids=np.arange(n, dtype=np.int64) * 7 + 9,
        file_names=tuple(f"{i:012d}.jpg" for i in range(n)),
        widths=np.full(n, 640, dtype=np.int64),
        heights=np.full(n, 640, dtype=np.int64),
        categories=tuple(Category(id=c + 1 + c // 10, name=f"class{c}") for c in range(classes)),
        ann_offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        ann_ids=np.arange(m, dtype=np.int64) + 1,
        boxes=np.concatenate([xy, xy + wh], axis=1).astype(np.float32),
        classes=rng.integers(0, classes, m).astype(np.int64),
        iscrowd=rng.random(m) < 0.01,
    )


def fold_assignment(n: int, k: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).permutation(np.arange(n) % k).astype(np.int64)


def fold_batches(
    ds: CocoDataset, fold_of_image: np.ndarray, k: int, dets: int, batch: int, seed: int = 1
):
    """Yield prediction batches fold by fold, interleaved as folds running side by side would."""
    rng = np.random.default_rng(seed)
    held = [np.flatnonzero(fold_of_image == f) for f in range(k)]
    pos = [0] * k
    cats = ds.category_ids
    while any(p < h.size for p, h in zip(pos, held)):
        for f in range(k):
            images = held[f][pos[f] : pos[f] + batch]
            pos[f] += batch
            if images.size == 0:
                continue
            d = images.size * dets
            xy = rng.uniform(0, 560, (d, 2)).astype(np.float32)
            wh = rng.uniform(2, 80, (d, 2)).astype(np.float32)
            # detectron2 returns each image's boxes by descending score
            scores = -np.sort(-rng.uniform(0.05, 1.0, (images.size, dets)).astype(np.float32), axis=1)
            yield make_prediction_batch(
                fold=f, image_indices=images, det_image_index=np.repeat(images, dets),
                boxes=np.concatenate([xy, xy + wh], axis=1), scores=scores.ravel(),
                classes=rng.integers(0, ds.num_classes, d), image_ids=ds.image_ids,
                category_ids=cats,
            )


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# ---- the child: stitch + write, measured alone ------------------------------------------------------
def child(args: argparse.Namespace) -> None:
    from kfold_ray.outputs._writers import (
        write_categories,
        write_cleanlab_labels,
        write_cleanlab_predictions,
        write_coco_results,
        write_predictions_parquet,
    )
    from kfold_ray.run._reduce import Reducer

    ds = synthetic_dataset(args.images, args.classes)
    fold_of_image = fold_assignment(args.images, args.k)
    run = Path(args.run_dir)
    rows = {"rss_before_mb": peak_rss_mb()}
    steps = []

    def step(name, fn):
        t = time.perf_counter()
        out = fn()
        steps.append((name, time.perf_counter() - t, peak_rss_mb()))
        return out

    table = step("read parts + stitch", lambda: Reducer(run).finish(fold_of_image, ds.num_images))
    step("predictions.parquet", lambda: write_predictions_parquet(run / "predictions.parquet", table))
    step("cleanlab_predictions.pkl", lambda: write_cleanlab_predictions(
        run / "cleanlab_predictions.pkl", table, num_images=ds.num_images, num_classes=ds.num_classes))
    step("cleanlab_labels.pkl", lambda: write_cleanlab_labels(run / "cleanlab_labels.pkl", ds))
    step("coco_results.json", lambda: write_coco_results(run / "coco_results.json", table))
    step("categories.json", lambda: write_categories(run / "categories.json", ds))
    rows["steps"] = steps
    rows["rows"] = table.num_rows
    rows["sizes_mb"] = {p.name: p.stat().st_size / 2**20 for p in run.iterdir() if p.is_file()}
    print(json.dumps(rows))


# ---- the baseline: the seed notebook's loop --------------------------------------------------------
def format_detectron2_predictions(boxes, classes, scores, num_classes):
    """The seed notebook's function, on numpy arrays instead of an ``Instances``."""
    results = [[] for _ in range(num_classes)]
    for i in range(len(classes)):
        pred_class = classes[i].item()
        score = scores[i].item()
        box_coordinates = list(boxes[i])
        box_coordinates.append(score)
        results[pred_class].append(box_coordinates)
    formatted_results = []
    for r in results:
        if len(r) == 0:
            formatted_array = np.array(r, dtype=np.float32).reshape((0, 5))  # seed: (0, num_classes)
        else:
            formatted_array = np.array(r, dtype=np.float32)
        formatted_results.append(formatted_array)
    return formatted_results


def baseline(ds: CocoDataset, fold_of_image, k, batches, workdir: Path) -> float:
    """Seconds for the seed's route from per-image outputs to the final cleanlab pickle."""
    per_image = {}  # what the predictor returned, per image: (boxes, classes, scores)
    for b in batches:
        img = b.column("image_index").to_numpy()
        boxes = np.stack([b.column(c).to_numpy() for c in ("x1", "y1", "x2", "y2")], axis=1)
        cls = b.column("class_index").to_numpy()
        sc = b.column("score").to_numpy()
        starts = np.searchsorted(img, np.unique(img))
        for s, e in zip(starts, list(starts[1:]) + [img.size]):
            per_image[int(img[s])] = (boxes[s:e], cls[s:e], sc[s:e])
    t = time.perf_counter()
    for f in range(k):
        result_dict = {}
        for i in np.flatnonzero(fold_of_image == f):
            boxes, cls, sc = per_image[int(i)]
            result_dict[ds.file_names[i]] = format_detectron2_predictions(boxes, cls, sc, ds.num_classes)
        with open(workdir / f"results_fold_{f}.pkl", "wb") as fh:
            pickle.dump(result_dict, fh)
    result_dict = {}
    for f in range(k):
        with open(workdir / f"results_fold_{f}.pkl", "rb") as fh:
            result_dict.update(pickle.load(fh))
    results = [result_dict[name] for name in ds.file_names]
    with open(workdir / "results_train_ALL.pkl", "wb") as fh:
        pickle.dump(results, fh)
    return time.perf_counter() - t


def ours_on_subset(ds, fold_of_image, k, batches, workdir: Path) -> float:
    """Seconds for our route on the same batches: persist, stitch, cleanlab pickle."""
    from kfold_ray.outputs._writers import write_cleanlab_predictions
    from kfold_ray.run._reduce import Reducer

    t = time.perf_counter()
    reducer = Reducer(workdir)
    for b in batches:
        reducer.add(b)
    table = reducer.finish(fold_of_image, ds.num_images)
    write_cleanlab_predictions(workdir / "cleanlab_predictions.pkl", table,
                               num_images=ds.num_images, num_classes=ds.num_classes)
    return time.perf_counter() - t


def metrics_seconds(n: int, classes: int, k: int, dets: int) -> dict[str, float]:
    from kfold_ray.outputs._metrics import coco_metrics
    from kfold_ray.run._stitch import stitch
    import pyarrow as pa

    ds = synthetic_dataset(n, classes)
    fold_of_image = fold_assignment(n, k)
    parts: dict[int, list] = {f: [] for f in range(k)}
    for b in fold_batches(ds, fold_of_image, k, dets, 64):
        parts[batch_fold(b)].append(b)
    folds = {f: (pa.Table.from_batches(bs).replace_schema_metadata(None),
                 np.flatnonzero(fold_of_image == f)) for f, bs in parts.items()}
    table = stitch(folds, fold_of_image, n)
    import importlib.util

    seconds = {}
    for evaluator in ("pycocotools", "faster_coco_eval"):
        if evaluator == "faster_coco_eval" and not importlib.util.find_spec(evaluator):
            continue
        t = time.perf_counter()
        coco_metrics(ds, table, fold_of_image, k, evaluator=evaluator)
        seconds[evaluator] = time.perf_counter() - t
    return seconds


# ---- main -----------------------------------------------------------------------------------
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=118_287)
    p.add_argument("--detections", type=int, default=100, help="per image")
    p.add_argument("--classes", type=int, default=80)
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--batch", type=int, default=64, help="images per streamed batch")
    p.add_argument("--baseline-images", type=int, default=5000)
    p.add_argument("--metrics-images", type=int, default=1000, help="0 to skip COCOeval timing")
    p.add_argument("--child", metavar="RUN_DIR", dest="run_dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.run_dir:
        return child(args)

    from kfold_ray.run._reduce import Reducer

    print(f"{args.images:,} images x {args.detections} detections, {args.classes} classes, k={args.k}, "
          f"batches of {args.batch} images, {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory(prefix="bench_reducer_", dir=os.environ.get("BENCH_TMP")) as tmp:
        run = Path(tmp) / "run"
        ds = synthetic_dataset(args.images, args.classes)
        fold_of_image = fold_assignment(args.images, args.k)
        reducer = Reducer(run)
        t_add = 0.0
        n_batches = 0
        for b in fold_batches(ds, fold_of_image, args.k, args.detections, args.batch):
            t = time.perf_counter()
            reducer.add(b)
            t_add += time.perf_counter() - t
            n_batches += 1
        del ds, reducer

        out = subprocess.run(
            [sys.executable, __file__, "--child", str(run), "--images", str(args.images),
             "--classes", str(args.classes), "--k", str(args.k)],
            check=True, capture_output=True, text=True,
        )
        res = json.loads(out.stdout.strip().splitlines()[-1])

        # baseline vs ours, same subset, same process
        sub = synthetic_dataset(args.baseline_images, args.classes, seed=2)
        sub_folds = fold_assignment(args.baseline_images, args.k, seed=2)
        sub_batches = list(fold_batches(sub, sub_folds, args.k, args.detections, args.batch, seed=3))
        (Path(tmp) / "base").mkdir()
        t_base = baseline(sub, sub_folds, args.k, sub_batches, Path(tmp) / "base")
        t_ours_sub = ours_on_subset(sub, sub_folds, args.k, sub_batches, Path(tmp) / "ours")
        t_metrics = metrics_seconds(args.metrics_images, args.classes, args.k, args.detections) \
            if args.metrics_images else None

    total = sum(s for _, s, _ in res["steps"])
    print(f"\nstitch + write ({res['rows']:,} detections), child process, "
          f"RSS before: {res['rss_before_mb']:.0f} MB")
    print(f"{'step':<28}{'seconds':>9}{'peak RSS MB':>13}{'file MB':>10}")
    sizes = res["sizes_mb"]
    for name, s, rss in res["steps"]:
        print(f"{name:<28}{s:>9.2f}{rss:>13.0f}{sizes.get(name, float('nan')):>10.0f}")
    print(f"{'total':<28}{total:>9.2f}{max(r for _, _, r in res['steps']):>13.0f}")
    print(f"\npersisting {n_batches} batches as they stream in (Reducer.add, spread over the run): "
          f"{t_add:.2f} s ({t_add / n_batches * 1e3:.1f} ms/batch)")
    print(f"\ncleanlab predictions route, {args.baseline_images:,} images (same batches):")
    base_rate = args.baseline_images / t_base
    ours_rate = args.baseline_images / t_ours_sub
    print(f"  {'seed notebook loop (format + per-fold pickles + merge)':<58}{t_base:7.2f} s "
          f"{base_rate:9,.0f} images/s")
    print(f"  {'kfold_ray (Reducer.add + finish + cleanlab pickle)':<58}{t_ours_sub:7.2f} s "
          f"{ours_rate:9,.0f} images/s   {ours_rate / base_rate:.1f}x")
    print(f"  kfold_ray, every output at {args.images:,} images: {args.images / total:,.0f} images/s;"
          f" the seed loop would take {args.images / base_rate:.0f} s for its pickle alone")
    for evaluator, t in (t_metrics or {}).items():
        print(f"\ncoco_metrics with {evaluator} (per fold + pooled), {args.metrics_images:,} images: "
              f"{t:.2f} s ({args.metrics_images / t:,.0f} images/s; "
              f"{args.images / (args.metrics_images / t) / 60:.0f} min at {args.images:,})")


if __name__ == "__main__":
    main()
