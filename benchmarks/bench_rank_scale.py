"""Ranking label issues at COCO-train scale: wall time and peak memory, child processes included.

Synthetic: 118,287 images x 100 detections, 80 classes, ~7.3 given boxes per image (as
bench_reducer.py), k = 5 folds; of each image's detections, one jittered copy of each given box
(most of the same class, some of another) and the rest anywhere, scores by image descending; a
``box_losses`` row per given box. Each measurement runs in a fresh child process (so that its peak
memory is its own) while the parent samples the RSS of the child and all its descendants every
0.1 s (psutil): cleanlab's ``find_label_issues`` starts process pools, whose memory counts too.

    kfold-ray       `rank_label_issues` as `kfold-ray report` calls it (box losses, with and
                    without calibration): cleanlab's per-box scores on auxiliary inputs built once,
                    image flags and quality from them (kfold_ray/_objectlab.py)
    before          what the ranking called before (cleanlab's ``get_label_quality_scores``,
                    ``find_label_issues`` and ``compute_*_box_scores``) on --cleanlab-images
                    images, the cost that kfold_ray/_objectlab.py removed (the rest of the
                    ranking came on top of it)

    .venv/bin/python benchmarks/bench_rank_scale.py                      # all of it (~8 min here)
    .venv/bin/python benchmarks/bench_rank_scale.py --images 5000 --cleanlab-images 1000
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

COCO_TRAIN = 118_287


def synthetic(n: int, dets: int, classes: int, k: int, seed: int = 0):
    """(dataset, prediction table, fold of each image, box-loss table)."""
    import pyarrow as pa

    from benchmarks.bench_reducer import synthetic_dataset
    from kfold_ray._schema import BOX_LOSS_SCHEMA, make_prediction_batch

    ds = synthetic_dataset(n, classes, seed)
    rng = np.random.default_rng(seed + 1)
    folds = rng.permutation(np.arange(n) % k).astype(np.int64)
    per_image = np.diff(ds.ann_offsets)
    # Per image: a jittered copy of each given box (up to `dets`), then random boxes.
    copies = np.minimum(per_image, dets)
    first = ds.ann_offsets[:-1]
    rows = np.concatenate([np.arange(s, s + c) for s, c in zip(first, copies)]) if n else np.zeros(0, int)
    near = ds.boxes[rows] + rng.normal(0, 4, (rows.size, 4)).astype(np.float32)
    near_cls = np.where(rng.random(rows.size) < 0.9, ds.classes[rows], rng.integers(0, classes, rows.size))
    rest = dets - copies
    m = int(rest.sum())
    xy = rng.uniform(0, 560, (m, 2)).astype(np.float32)
    far = np.concatenate([xy, xy + rng.uniform(2, 80, (m, 2)).astype(np.float32)], axis=1)
    image = np.concatenate([np.repeat(np.arange(n), copies), np.repeat(np.arange(n), rest)])
    order = np.argsort(image, kind="stable")
    image = image[order]
    boxes = np.concatenate([near, far])[order]
    cls = np.concatenate([near_cls, rng.integers(0, classes, m)])[order]
    scores = -np.sort(-rng.uniform(0.05, 1.0, (n, dets)), axis=1).ravel()  # by image, descending
    batches = []
    for f in range(k):
        mine = folds[image] == f
        batches.append(make_prediction_batch(
            fold=f, image_indices=np.flatnonzero(folds == f), det_image_index=image[mine],
            boxes=boxes[mine], scores=scores[mine], classes=cls[mine], image_ids=ds.image_ids,
            category_ids=ds.category_ids))
    table = pa.Table.from_batches(batches).sort_by([("image_index", "ascending")])
    kept = np.flatnonzero(~ds.iscrowd)
    box_image = np.repeat(np.arange(n), per_image)[kept]
    # The fold models mostly agree with the labels (p_given ~ Beta(8, 1), the box where they
    # would put it at IoU 0.7-1); 5 % of the boxes look swapped, shifted or spurious.
    u = rng.uniform(0, 1, (kept.size, 2)).astype(np.float32)
    p_given = rng.beta(8, 1, kept.size).astype(np.float32)
    refined = (0.7 + 0.3 * u[:, 1]).astype(np.float32)
    odd = rng.random(kept.size) < 0.05
    p_given[odd] *= u[odd, 0] * 0.3
    refined[odd] *= 0.5
    losses = pa.table({"image_index": box_image, "ann_row": kept,
                       "loss_cls": -np.log(p_given + 1e-3), "loss_box_reg": 1 - refined,
                       "p_given": p_given, "p_background": (1 - p_given) * u[:, 0],
                       "p_other": (1 - p_given) * (1 - u[:, 0]),
                       "other_class": rng.integers(0, classes, kept.size).astype(np.int32),
                       "refined_iou": refined}, schema=BOX_LOSS_SCHEMA)
    return ds, table, folds, losses


# ---- children: one measurement each ---------------------------------------------------------------
def child(args: argparse.Namespace) -> None:
    t = time.perf_counter()
    ds, table, folds, losses = synthetic(args.images, args.dets, args.classes, args.k)
    make_s = time.perf_counter() - t
    import psutil

    rss_before = psutil.Process().memory_info().rss / 2**20
    extra: dict = {}
    cpu = time.process_time()
    t = time.perf_counter()
    if args.mode == "cleanlab":
        # What the ranking called before kfold_ray/_objectlab.py: cleanlab's image scores and
        # flags, and its per-box scores on the auxiliary inputs.
        from cleanlab.object_detection import filter as cl_filter
        from cleanlab.object_detection import rank as cl_rank

        from kfold_ray.outputs._writers import cleanlab_predictions
        from kfold_ray.report._objectlab import auxiliary_inputs

        labels = ds.cleanlab_labels()
        predictions = cleanlab_predictions(table, num_images=ds.num_images, num_classes=ds.num_classes)
        cl_rank.get_label_quality_scores(labels, predictions, verbose=False)
        cl_filter.find_label_issues(labels, predictions)
        aux = auxiliary_inputs(labels, predictions)
        for f in (cl_rank.compute_overlooked_box_scores, cl_rank.compute_swap_box_scores,
                  cl_rank.compute_badloc_box_scores):
            f(auxiliary_inputs=aux)
    elif args.mode == "aux":
        _per_image_before(ds, table, losses)
    else:
        from kfold_ray.report._rank import rank_issues

        images, boxes = rank_issues(ds, table, fold_of_image=folds, box_losses=losses,
                                    calibrate=args.mode == "calibrated")
        extra["box_rows"] = boxes.num_rows
    seconds = time.perf_counter() - t
    extra["cpu_seconds"] = time.process_time() - cpu  # this process's user + system time
    if args.mode in ("raw", "calibrated"):  # the files `kfold-ray report` writes, timed apart
        import tempfile

        from kfold_ray.report._box_issues import write_box_issues
        from kfold_ray.report._rank import write_label_issues

        w = time.perf_counter()
        with tempfile.TemporaryDirectory() as d:
            write_label_issues(d, images)
            write_box_issues(d, boxes)
        extra["write_seconds"] = time.perf_counter() - w
    usage = {who: resource.getrusage(w).ru_maxrss / 1024 for who, w in
             (("self", resource.RUSAGE_SELF), ("children", resource.RUSAGE_CHILDREN))}
    print(json.dumps({"seconds": seconds, "make_seconds": make_s, "rss_before_mb": rss_before,
                      "maxrss_self_mb": usage["self"],
                      "maxrss_children_mb": usage["children"], **extra}))


def _per_image_before(ds, table, losses) -> None:
    """What `rank_label_issues` computed per image before the flat pass (kfold-ray 0.1, issue
    18's "today"): cleanlab's inputs per image (`_objectlab.auxiliary_inputs`), its per-box
    scores, pooled, quality and flags, and the per-image loss and unmatched signals; not its
    kinds, nor any per-box ranking."""
    from cleanlab.object_detection import rank as cl_rank

    from kfold_ray.outputs._writers import cleanlab_predictions
    from kfold_ray.report._objectlab import (
        auxiliary_inputs,
        box_scores,
        find_label_issues,
        label_quality_scores,
    )

    predictions = cleanlab_predictions(table, num_images=ds.num_images, num_classes=ds.num_classes)
    aux = auxiliary_inputs(ds.cleanlab_labels(), predictions)
    per_box = box_scores(aux)
    pooled = {k: np.asarray(cl_rank.pool_box_scores_per_image(v)) for k, v in per_box.items()}
    label_quality_scores(pooled)
    find_label_issues(aux, per_box, ds.num_classes)
    unmatched = np.zeros(ds.num_images)
    for i, a in enumerate(aux):
        probs, iou = a["pred_label_probs"], a["iou_matrix"]
        if probs.size:
            free = np.ones(probs.size, bool) if iou.shape[0] == 0 else iou.max(axis=0) < 0.5
            unmatched[i] = probs[free].max(initial=0.0)
    loss = np.zeros(ds.num_images)
    np.maximum.at(loss, losses.column("image_index").to_numpy(),
                  losses.column("loss_cls").to_numpy() + losses.column("loss_box_reg").to_numpy())


def measure(mode: str, images: int, args: argparse.Namespace) -> dict:
    """Run one child; sample the RSS of it and every descendant; return its numbers."""
    import psutil

    cmd = [sys.executable, __file__, "--child", mode, "--images", str(images), "--dets",
           str(args.dets), "--classes", str(args.classes), "-k", str(args.k)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    me = psutil.Process(proc.pid)
    peak, processes = 0, 1
    while proc.poll() is None:
        try:
            tree = [me, *me.children(recursive=True)]
            processes = max(processes, len(tree))
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.1)
    out = proc.stdout.read()
    if proc.returncode:
        raise SystemExit(f"{mode} on {images} images failed ({proc.returncode})")
    result = json.loads(out.strip().splitlines()[-1])
    result.update(mode=mode, images=images, peak_tree_mb=peak / 2**20, processes=processes)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=COCO_TRAIN)
    p.add_argument("--cleanlab-images", type=int, default=2000,
                   help="images for cleanlab's own calls (minutes per thousand images)")
    p.add_argument("--dets", type=int, default=100)
    p.add_argument("--classes", type=int, default=80)
    p.add_argument("-k", type=int, default=5)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = p.parse_args()
    if args.child:
        args.mode = args.child
        child(args)
        return
    runs = [measure("cleanlab", args.cleanlab_images, args),
            measure("raw", args.cleanlab_images, args),
            measure("aux", args.images, args),
            measure("raw", args.images, args),
            measure("calibrated", args.images, args)]
    what = {"cleanlab": "cleanlab's get_label_quality_scores, find_label_issues, "
                        "compute_*_box_scores",
            "aux": "before: per image from cleanlab's auxiliary inputs (per-image ranking only)",
            "raw": "kfold-ray rank_issues (per image + per box)",
            "calibrated": "kfold-ray rank_issues, calibrate"}
    print(f"\n{args.dets} detections per image, {args.classes} classes, k={args.k}; "
          "peak = RSS of the process and all its descendants, sampled every 0.1 s")
    print("| what | images | seconds | images/s | peak RSS, tree (before ranking; the ranking's own) "
          "| processes | box rows | writing the files |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in runs:
        own = r["peak_tree_mb"] - r["rss_before_mb"]
        write = f"{r['write_seconds']:.1f} s" if "write_seconds" in r else ""
        rows = f"{r['box_rows']:,}" if "box_rows" in r else ""
        print(f"| {what[r['mode']]} | {r['images']:,} | {r['seconds']:.1f} | "
              f"{r['images'] / r['seconds']:,.0f} | {r['peak_tree_mb']:,.0f} MB "
              f"({r['rss_before_mb']:,.0f} MB; {own:,.0f} MB) | {r['processes']} | "
              f"{rows} | {write} |")
    cl, before, now = runs[0], runs[2], runs[3]
    scaled = cl["seconds"] * args.images / cl["images"]
    print(f"\ncleanlab's calls, scaled linearly to {args.images:,} images: {scaled / 60:.0f} min; "
          f"before: {before['seconds']:.1f} s per image only; now per image + per box: "
          f"{now['seconds']:.1f} s ({before['seconds'] / now['seconds']:.2f}x)")
    if args.out:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                        "runs": runs}, indent=2) + "\n")


if __name__ == "__main__":
    main()
