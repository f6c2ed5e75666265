"""How well each label-error signal finds known label errors: out-of-fold vs in-sample predictions.

On the built-in digits example (`kfold_ray.data._example.make_digits_example`: handwritten digits with
~10 % of the images given one recorded label error: a swapped class, a missing box or a shifted
box), one `run_cv(..., in_sample=True)` with the example's own config (`kfold-ray example`: the
tiny preset; only --max-iter changes) trains the K fold models AND one model on every image (same
model, same iterations). Each set of predictions is then ranked by `kfold_ray.report._rank`, and each
signal (one score per image, higher = more likely wrong) is scored:

    cleanlab raw         1 - cleanlab's label quality score on the raw predictions
    cleanlab calibrated  the same on cross-fitted, per-class calibrated scores (kfold_ray.report._calibrate)
    loss                 loss_score: worst given box's loss_cls + loss_box_reg (box_losses.parquet)
    unmatched            unmatched_score: best prediction overlapping no given box
    combined             combined_score: the larger rank fraction of the two (the default ranking)

    AUROC          telling corrupted images from clean ones
    P@N            precision among the N worst-ranked images, N = number of corrupted images
    kind ok        (default ranking) corrupted images in the top N given the injected kind, and of
                   all corrupted images (missing -> overlooked, swapped -> swapped, shifted ->
                   badly_located)

and two diagnostics of WHY cleanlab does well or badly:

    conf>=.95      share of the true objects (annotations_clean.json) whose best same-class
                   prediction (IoU >= 0.5) scores >= 0.95: cleanlab only looks for overlooked and
                   swapped boxes among predictions scoring >= 0.95 (its HIGH_PROBABILITY_THRESHOLD)
    AUROC@t        AUROC of cleanlab's quality score recomputed (public per-box functions, same
                   pooling and weights) with that threshold lowered to t

    python benchmarks/bench_label_issues.py --out runs/bench-label-issues/iter150    # the example's budget
    python benchmarks/bench_label_issues.py --out runs/bench-label-issues/iter300 --max-iter 300
    python benchmarks/bench_label_issues.py --out ... --reuse     # re-rank a finished run dir

Results also go to RUN_DIR/bench_label_issues.json.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np

EXPECTED_KIND = {"missing": "overlooked", "swapped": "swapped", "shifted": "badly_located"}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from kfold_ray.data._example import make_digits_example

    data = make_digits_example(args.out / "data", n_images=args.images, image_size=args.image_size,
                               seed=args.seed, corrupt_fraction=args.corrupt_fraction)
    injected = json.loads(data.injected_errors_path.read_text())
    run_dir = args.out / "run"
    started = time.perf_counter()
    reused = args.reuse and _finished(run_dir)
    if not reused:
        _train(args, data, run_dir)
    train_s = None if reused else time.perf_counter() - started

    from kfold_ray.report._finished_run import read_finished_run

    run = read_finished_run(run_dir)
    results = {}
    for name, in_sample in (("out-of-fold", False), ("in-sample", True)):
        if in_sample and not run.has_in_sample:
            continue
        results[name] = _rank_and_score(run, in_sample, injected)
        ap = run.metrics.get("in_sample" if in_sample else "pooled", {})
        results[name]["pooled_AP"] = ap.get("AP") if isinstance(ap, dict) else None
        results[name]["pooled_AP50"] = ap.get("AP50") if isinstance(ap, dict) else None
        results[name].update(_diagnose(run, in_sample, data.clean_annotations_path, injected))
    _print(results, args, injected, train_s)
    record = {"command": _command(), "args": {k: str(v) for k, v in vars(args).items()},
              "n_images": args.images, "n_corrupted": len({e["image_id"] for e in injected}),
              "train_and_predict_seconds": None if train_s is None else round(train_s, 1),
              "results": results}
    (run_dir / "bench_label_issues.json").write_text(json.dumps(record, indent=2) + "\n")
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/bench-label-issues"), help="data + run dir")
    p.add_argument("--images", type=int, default=150)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--corrupt-fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0, help="dataset seed (the fold split uses seed 0)")
    p.add_argument("-k", type=int, default=3)
    p.add_argument("--max-iter", type=int, default=150, help="training iterations per model "
                   "(default: the example's)")
    p.add_argument("--gpus-per-fold", type=float, default=0.0)
    p.add_argument("--opts", nargs="*", default=[], metavar="KEY VALUE", help="more Detectron2 overrides")
    p.add_argument("--no-in-sample", dest="in_sample", action="store_false",
                   help="skip the in-sample baseline (one more training on every image)")
    p.add_argument("--reuse", action="store_true", help="re-rank the finished run in --out, no training")
    return p


def _finished(run_dir: Path) -> bool:
    try:
        return json.loads((run_dir / "run.json").read_text()).get("status") == "finished"
    except (OSError, ValueError):
        return False


def _train(args, data, run_dir: Path) -> None:
    import ray

    from kfold_ray import run_cv
    from kfold_ray.data._example import EXAMPLE_MODEL, example_overrides

    # The example's own config (`kfold-ray example`): only the iterations change with --max-iter.
    run_cv(data.annotations_path, args.k, image_root=data.image_dir, model=EXAMPLE_MODEL,
           overrides=[*example_overrides(args.max_iter), *args.opts],
           gpus_per_fold=args.gpus_per_fold, run_dir=run_dir, address="local",
           resume=(run_dir / "run.json").is_file(), in_sample=args.in_sample,
           progress=sys.stderr.isatty())
    ray.shutdown()


SIGNALS = ("cleanlab raw", "cleanlab calibrated", "loss", "unmatched", "combined")


def _rank_and_score(run, in_sample: bool, injected: list[dict]) -> dict:
    """Rank once with raw and once with calibrated scores; score every signal."""
    from kfold_ray.report._rank import label_issues_for_run

    t = time.perf_counter()
    raw = label_issues_for_run(run, in_sample=in_sample, calibrate=False, write=False)
    raw_s = time.perf_counter() - t
    t = time.perf_counter()
    calibrated = label_issues_for_run(run, in_sample=in_sample, calibrate=True, write=False)
    calibrated_s = time.perf_counter() - t
    by_id = lambda table, column: dict(zip(table.column("image_id").to_pylist(),  # noqa: E731
                                           table.column(column).to_pylist()))
    ids = sorted(by_id(raw, "rank"))
    scores = {
        "cleanlab raw": [1 - by_id(raw, "quality_score")[i] for i in ids],
        "cleanlab calibrated": [1 - by_id(calibrated, "quality_score")[i] for i in ids],
        "loss": [by_id(raw, "loss_score")[i] for i in ids],
        "unmatched": [by_id(raw, "unmatched_score")[i] for i in ids],
        "combined": [by_id(raw, "combined_score")[i] for i in ids],
    }
    kind_of = {e["image_id"]: e["kind"] for e in injected}
    y = np.array([i in kind_of for i in ids])
    out = {"signals": {name: _score(y, np.array(v, dtype=float)) for name, v in scores.items()}}
    out["kinds"] = _kinds(raw, kind_of)
    out["rank_seconds"] = {"raw": round(raw_s, 2), "calibrated": round(calibrated_s, 2)}
    out["flagged"] = {"raw": int(sum(raw.column("is_issue").to_pylist())),
                      "calibrated": int(sum(calibrated.column("is_issue").to_pylist()))}
    return out


def _score(y: np.ndarray, score: np.ndarray) -> dict:
    """AUROC and precision@N of one signal (None where it could not be computed: no losses)."""
    from sklearn.metrics import roc_auc_score

    n = int(y.sum())
    if np.isnan(score).any() or not 0 < n < len(y):
        return {"auroc": None, "precision_at_n": None}
    top = np.argsort(-score, kind="stable")[:n]
    return {"auroc": round(float(roc_auc_score(y, score)), 4),
            "precision_at_n": round(float(y[top].mean()), 4)}


def _kinds(table, kind_of: dict[int, str]) -> dict:
    """Of the corrupted images (in the ranking's top N, and all): how many got the injected kind."""
    rows = table.to_pylist()  # worst first
    n = len(kind_of)
    right = [r["image_id"] in kind_of and r["issue_kind"] == EXPECTED_KIND[kind_of[r["image_id"]]]
             for r in rows]
    corrupted = [r["image_id"] in kind_of for r in rows]
    per_kind = {}
    for kind in EXPECTED_KIND:
        mine = [(r, ok) for r, ok in zip(rows, right) if kind_of.get(r["image_id"]) == kind]
        per_kind[kind] = {"n": len(mine), "mean_rank": round(float(np.mean([r["rank"] for r, _ in mine])), 1)
                          if mine else None, "kind_named": sum(ok for _, ok in mine),
                          "named_as": sorted(r["issue_kind"] or "-" for r, _ in mine)}
    return {"n": n, "in_top_n": sum(corrupted[:n]), "ok_in_top_n": sum(right[:n]), "ok_all": sum(right),
            "per_kind": per_kind}


def _diagnose(run, in_sample: bool, clean_annotations: Path, injected: list[dict]) -> dict:
    import pyarrow.parquet as pq
    from cleanlab.internal.constants import TINY_VALUE
    from cleanlab.object_detection import rank as cl_rank
    from sklearn.metrics import roc_auc_score

    from kfold_ray.data._dataset import load_coco
    from kfold_ray.outputs._writers import cleanlab_predictions
    from kfold_ray.report._objectlab import _iou_matrix, auxiliary_inputs

    ds = run.dataset
    table = pq.read_table(run.run_dir / ("in_sample" if in_sample else "") / "predictions.parquet")
    predictions = cleanlab_predictions(table, num_images=ds.num_images, num_classes=ds.num_classes)
    aux = auxiliary_inputs(ds.cleanlab_labels(), predictions)
    bad = {e["image_id"] for e in injected}
    y = np.array([int(i) in bad for i in ds.image_ids])
    auroc_at = {}
    for t in (0.95, 0.8, 0.6):
        pooled = [cl_rank.pool_box_scores_per_image(scores) for scores in (
            cl_rank.compute_overlooked_box_scores(auxiliary_inputs=aux, high_probability_threshold=t),
            cl_rank.compute_swap_box_scores(auxiliary_inputs=aux, high_probability_threshold=t),
            cl_rank.compute_badloc_box_scores(auxiliary_inputs=aux))]
        quality = np.exp(sum(np.log(TINY_VALUE + p) for p in pooled) / 3)  # cleanlab's default weights
        auroc_at[str(t)] = round(float(roc_auc_score(y, 1 - quality)), 4)
    truth = load_coco(clean_annotations, ds.image_root, check_images=False)
    best = []
    for i, a in enumerate(aux):
        boxes, classes, crowd = truth.annotations_of(i)
        iou = _iou_matrix(boxes[~crowd].astype(np.float64), a["pred_bboxes"], 1e-6)
        same = classes[~crowd][:, None] == a["pred_labels"][None, :]
        scores = np.where((iou >= 0.5) & same, a["pred_label_probs"][None, :], 0.0)
        best += scores.max(axis=1, initial=0.0).tolist()
    return {"confident_share": round(float(np.mean(np.array(best) >= 0.95)), 4), "auroc_at": auroc_at}


def _print(results: dict, args, injected: list[dict], train_s: float | None) -> None:
    n_corrupt = len({e["image_id"] for e in injected})
    print(f"\ndigits example: {args.images} images ({args.image_size} px), {n_corrupt} with one injected "
          f"label error; k={args.k}, the example's config (tiny Faster R-CNN from scratch), "
          f"{args.max_iter} iterations per model; "
          + ("re-ranked a finished run" if train_s is None else f"train+predict {train_s:.0f} s"))
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    header = f"{'signal':<20}" + "".join(f" {name + ' AUROC':>18} {'P@' + str(n_corrupt):>6}"
                                         for name in results)
    print(header)
    print("-" * len(header))
    for signal in SIGNALS:
        print(f"{signal:<20}" + "".join(
            f" {fmt(r['signals'][signal]['auroc']):>18} {fmt(r['signals'][signal]['precision_at_n']):>6}"
            for r in results.values()))
    for name, r in results.items():
        k = r["kinds"]
        ap = r.get("pooled_AP")
        print(f"\n{name}: pooled AP {fmt(ap)}, AP50 {fmt(r.get('pooled_AP50'))}; cleanlab flags "
              f"{r['flagged']['raw']} images (calibrated: {r['flagged']['calibrated']}); ranking "
              f"{r['rank_seconds']['raw']} s (calibrated {r['rank_seconds']['calibrated']} s)")
        print(f"  kind named right: {k['ok_in_top_n']} of the {k['in_top_n']} corrupted images in the top "
              f"{k['n']}, {k['ok_all']} of all {k['n']}")
        for kind, v in k["per_kind"].items():
            print(f"    {kind:<8} mean rank {v['mean_rank']}, named as {', '.join(v['named_as'])}")
        at = ", ".join(f"@{t}: {v:.3f}" for t, v in r["auroc_at"].items())
        print(f"  why: conf>=.95 {r['confident_share']:.3f}; cleanlab AUROC {at}")
    print(f"\ncommand: {_command()}")


def _command() -> str:
    return " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])


if __name__ == "__main__":
    sys.exit(main())
