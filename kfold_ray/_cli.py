"""Command line: ``kfold-ray run | validate | example | report | export | apply``.

Exit codes: 0 success; 2 bad input or usage (one line on stderr, no traceback); 1 a failure
during the run (a fold that failed for good, ...); 130 interrupted (Ctrl-C: finish later with
``--resume``). Flags map one-to-one onto `run_cv`'s options. Each command calls one function of
`kfold_ray._api`; this module only parses flags and prints.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from . import _api
from ._api import CALIBRATE_DEFAULT, EXAMPLE_MAX_ITER, EXPORT_FORMATS
from ._config import DEFAULT_MODEL, SPLITS
from ._exceptions import USER_INPUT_ERRORS, KfoldRayError, one_line

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # usage errors: one line, exit 2
        self.exit(EXIT_BAD_INPUT, f"kfold-ray: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kfold-ray", description="Out-of-fold Detectron2 predictions for a COCO dataset, "
                     "on Ray; rank likely label errors, review them, apply the fixes.",
                     epilog="exit codes: 0 done; 1 a failure during the run; 2 bad input or usage "
                            "(one line, nothing written); 130 interrupted (finish with --resume)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="K-fold train + predict; write outputs to the run dir")
    _dataset_args(run)
    _run_args(run)

    val = sub.add_parser("validate", help="check a dataset (and a k) without running anything")
    _dataset_args(val)
    val.add_argument("-k", type=int, default=None, help="also check that this many folds fit (default: no fold check)")
    val.add_argument("--split", default="kfold", choices=SPLITS, help="fold split to check (default kfold)")
    val.add_argument("--group-field", default=None, help="image field holding the group (split=group; default none)")

    _example_parser(sub)

    doc = sub.add_parser("doctor", help="check every node of the cluster: torch, CUDA, driver, "
                                        "GPUs, Detectron2's build, CPUs, the run's storage")
    doc.add_argument("--address", default=None,
                     help="Ray cluster address (as for run; default: RAY_ADDRESS, else the cluster "
                          "on this node, else a new local one)")
    doc.add_argument("--storage", default=None, metavar="URI",
                     help="also check that every node reaches this run dir or bucket (path or URI; "
                          "default: no storage check)")

    rep = sub.add_parser("report", help="rank likely label errors of a finished run; write report/index.html")
    rep.add_argument("run_dir", metavar="RUN_DIR", help="a finished run's folder (path or URI)")
    rep.add_argument("--top", type=int, default=20, help="suspect images shown on the page (default 20)")
    rep.add_argument("--calibrate", action=argparse.BooleanOptionalAction, default=CALIBRATE_DEFAULT,
                     help="score with per-class calibrated detection scores, each fold's mapped by a "
                          "calibration fitted on the other folds' images (default: "
                          f"{'on' if CALIBRATE_DEFAULT else 'off'}; benchmarks/README.md)")
    _export_parser(sub)
    _apply_parser(sub)
    return parser


def _example_parser(sub) -> None:
    ex = sub.add_parser("example", help="run the whole pipeline on the built-in digits example")
    ex.add_argument("--run-dir", default="runs/example",
                    help="a path, or a URI on a cluster: the example data then goes beside it "
                         "(<run-dir>-data) in the same storage, where every node reads it (default "
                         "runs/example; a finished example run there is reported again, not redone)")
    ex.add_argument("--images", type=int, default=150, help="number of example images (default 150)")
    ex.add_argument("-k", type=int, default=3, help="number of folds (default 3)")
    ex.add_argument("--max-iter", type=int, default=EXAMPLE_MAX_ITER,
                    help=f"training iterations per fold (default {EXAMPLE_MAX_ITER})")
    ex.add_argument("--seed", type=int, default=0,
                    help="seeds the example's images and errors, the fold plan and training (default 0)")
    ex.add_argument("--gpus-per-fold", type=float, default=1.0,
                    help="GPUs per fold (default 1; folds train on CPU on a local machine without GPUs)")
    ex.add_argument("--resume", action="store_true", help="finish an interrupted example run in --run-dir")
    ex.add_argument("--address", default=None, help="Ray cluster address (as for run; default: as for run)")


def _export_parser(sub) -> None:
    exp = sub.add_parser("export", help="write a finished run's worst images for review in FiftyOne, "
                                        "Label Studio or CVAT (COCO)")
    exp.add_argument("run_dir", metavar="RUN_DIR", help="a finished run's folder (path or URI)")
    exp.add_argument("--to", required=True, choices=EXPORT_FORMATS,
                     help="fiftyone: a folder fo.Dataset.from_dir reads; labelstudio: a tasks JSON "
                          "(and its labeling config, OUT with .xml); coco: the suspects as a COCO "
                          "subset with their ids (CVAT: import as COCO 1.0)")
    exp.add_argument("--top", type=int, default=100, help="how many of the worst images (default 100)")
    exp.add_argument("--out", required=True, help="the folder (fiftyone) or file (labelstudio, coco) to write")
    exp.add_argument("--min-score", type=float, default=None,
                     help="leave out predictions scoring below this (default: 0.5 for labelstudio, "
                          "which shows every box; all of the run's for fiftyone)")
    exp.add_argument("--image-url", default=None,
                     help="labelstudio: the URL prefix Label Studio serves the image root at (default "
                          "/data/local-files/?d= , Label Studio's local files; a URI image root stays a URI)")
    exp.add_argument("--annotations", default=None,
                     help="the run's COCO json, if it moved since the run (default: where the run read it)")
    exp.add_argument("--images", default=None,
                     help="the run's image root, if it moved (default: the run's)")


def _apply_parser(sub) -> None:
    app = sub.add_parser("apply", help="write the dataset corrected by a review (Label Studio, CVAT, FiftyOne)")
    app.add_argument("--annotations", required=True, help="the original COCO json (path or URI; never overwritten)")
    app.add_argument("--fixes", required=True,
                     help="the review: a Label Studio JSON export, or a COCO json from CVAT (COCO 1.0) "
                          "or FiftyOne (COCODetectionDataset: the file or its folder)")
    app.add_argument("--out", default=None,
                     help="the corrected COCO json (default: <annotations stem>.fixed.json beside it); "
                          "the changes go beside it (<out stem>.changes.csv)")


def _dataset_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--annotations", required=True, help="COCO annotations json (path or URI)")
    p.add_argument("--images", default=None,
                   help="image root, a path or a URI every node reads, e.g. s3://bucket/images "
                        "(default: the json's folder)")
    p.add_argument("--exclude-unreadable", action="store_true",
                   help="leave out images whose file is missing, corrupt or unreadable (and their "
                        "annotations) instead of stopping; they are listed in a warning")


def _run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-k", type=int, default=5, help="number of folds (default 5)")
    p.add_argument("--run-dir", default=None,
                   help="output folder: a path, or a URI on a cluster (s3://, gs://, hdfs://, file://); "
                        "default runs/<name>-<time>")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"model-zoo name, YAML path, or preset 'tiny' (default {DEFAULT_MODEL}: "
                        "Faster R-CNN R50-FPN on its 3x schedule, 270,000 iterations at batch 16, "
                        "LR steps at 210k and 250k; shorten it with --opts SOLVER.MAX_ITER N "
                        "SOLVER.STEPS \"(a, b)\")")
    p.add_argument("--opts", nargs="+", default=[], metavar="KEY VALUE",
                   help="Detectron2 config overrides, e.g. --opts SOLVER.MAX_ITER 2000 (default none)")
    p.add_argument("--gpus-per-fold", type=float, default=1.0,
                   help="GPUs per fold (default 1): 0.5 packs two folds per GPU; a whole number N "
                        "trains each fold on N GPUs (DDP); on a local machine without GPUs, folds train on CPU")
    p.add_argument("--cpus-per-fold", type=float, default=None,
                   help="CPUs per fold (default: its share of its node's CPUs per GPU; 1 per worker without GPUs)")
    p.add_argument("--workers-per-fold", type=int, default=None,
                   help="processes that train each fold data-parallel (Ray Train DDP; gloo on CPU); "
                        "SOLVER.IMS_PER_BATCH is their total batch (default: the fold's whole GPUs, else 1)")
    p.add_argument("--workers-across-nodes", action="store_true",
                   help="let a multi-GPU fold's workers spread over several nodes (default: off, "
                        "one node per fold, so only nodes with that many GPUs host it)")
    p.add_argument("--split", default="kfold", choices=SPLITS,
                   help="how images go into folds: shuffled kfold, group (by --group-field) or "
                        "stratified by the classes present (default kfold)")
    p.add_argument("--group-field", default=None, help="image field holding the group (split=group; default none)")
    p.add_argument("--seed", type=int, default=0,
                   help="seeds the fold plan and each fold's training (fold f: seed + f; default 0)")
    p.add_argument("--batch-size", type=int, default=8, help="held-out images per inference call (default 8)")
    p.add_argument("--score-threshold", type=float, default=0.05,
                   help="detections scoring below this are dropped (default 0.05: keep it low, the "
                        "ranking wants the unsure boxes too)")
    p.add_argument("--no-amp", dest="amp", action="store_false",
                   help="no mixed precision on GPU (default: mixed precision on GPU; none on CPU)")
    p.add_argument("--max-retries", type=int, default=2,
                   help="restarts of a fold whose process dies, each from its last checkpoint (default 2)")
    p.add_argument("--checkpoint-period", type=int, default=None,
                   help="training iterations between checkpoints (default: the model config's)")
    p.add_argument("--keep-checkpoints", type=int, default=2,
                   help="newest checkpoints kept per fold (default 2)")
    p.add_argument("--address", default=None,
                   help="Ray cluster address; 'local' starts a new local cluster (default: RAY_ADDRESS, "
                        "else the cluster running on this node, else a new local one)")
    p.add_argument("--resume", action="store_true", help="finish an interrupted run in --run-dir")
    p.add_argument("--in-sample", action="store_true",
                   help="also train once on all images and predict them (in_sample/ in the run dir): "
                        "the baseline the report compares the out-of-fold predictions with (default off)")
    p.add_argument("--quiet", action="store_true", help="no progress output (default: progress on stderr)")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="[kfold-ray] %(levelname)s %(message)s")
    try:
        if args.command == "validate":
            return _validate(args)
        if args.command == "example":
            return _example(args)
        if args.command == "report":
            return _report(args)
        if args.command == "doctor":
            return _doctor(args)
        if args.command == "export":
            return _export(args)
        if args.command == "apply":
            return _apply(args)
        return _run(args)
    except USER_INPUT_ERRORS as e:
        # A dataset's problems, one line each (the first 50, then how many more); else one line.
        lines = getattr(e, "problems", None) or [str(e)]
        for line in lines[:50]:
            print(f"kfold-ray: error: {one_line(line)}", file=sys.stderr)
        more = max(getattr(e, "problem_count", 0), len(lines)) - min(len(lines), 50)
        if more > 0:
            print(f"kfold-ray: error: ... and {more} more problem{'s' if more > 1 else ''}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KfoldRayError as e:
        print(f"kfold-ray: failed: {one_line(e)}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("kfold-ray: interrupted; finish later with the same command and --resume", file=sys.stderr)
        return 130


def _validate(args) -> int:
    dataset, plan = _api.validate_dataset(args.annotations, args.images, k=args.k, split=args.split,
                                          groups=args.group_field,
                                          exclude_unreadable=args.exclude_unreadable)
    msg = f"ok: {dataset.num_images} images, {len(dataset.boxes)} boxes, {dataset.num_classes} classes"
    if plan is not None:
        msg += f"; {args.k} folds of {', '.join(map(str, plan.fold_sizes().tolist()))} images"
    print(msg)
    if dataset.mask_problems:
        n = dataset.segmentations.problem_count
        print(f"kfold-ray: warning: {n} segmentation{'s' if n > 1 else ''} cannot be used: an error "
              f"only for a model that trains masks (MODEL.MASK_ON); the first: {dataset.mask_problems[0]}",
              file=sys.stderr)
    return EXIT_OK


def _run(args) -> int:
    if len(args.opts) % 2:
        print(f"kfold-ray: error: --opts takes KEY VALUE pairs; got {len(args.opts)} items", file=sys.stderr)
        return EXIT_BAD_INPUT
    result = _api.run_cv(
        args.annotations, args.k, image_root=args.images, model=args.model, overrides=args.opts,
        gpus_per_fold=args.gpus_per_fold, cpus_per_fold=args.cpus_per_fold,
        workers_per_fold=args.workers_per_fold, workers_across_nodes=args.workers_across_nodes,
        split=args.split,
        groups=args.group_field, seed=args.seed, run_dir=args.run_dir,
        score_threshold=args.score_threshold, batch_size=args.batch_size, amp=args.amp,
        max_retries=args.max_retries, checkpoint_period=args.checkpoint_period,
        keep_checkpoints=args.keep_checkpoints,
        address=args.address, resume=args.resume, progress=not args.quiet,
        exclude_unreadable=args.exclude_unreadable, in_sample=args.in_sample,
    )
    _print_summary(result)
    return EXIT_OK


def _example(args) -> int:
    run_dir = args.run_dir.rstrip("/")
    data = _api.example_data(run_dir, n_images=args.images, seed=args.seed)
    print(f"example dataset: {data.annotations} ({args.images} images, injected label errors "
          f"listed in {data.injected_errors})")
    result = _api.run_example(data, run_dir=run_dir, k=args.k, max_iter=args.max_iter,
                              gpus_per_fold=args.gpus_per_fold, resume=args.resume,
                              address=args.address, seed=args.seed)
    if result.metrics.get("reopened"):
        print(f"{run_dir} already holds this finished example run: reporting it again (another "
              "--run-dir starts a new one)")
    _print_summary(result)
    report = _api.report_run(result.run_dir, top=20, dataset=result.dataset,
                             injected_errors=data.injected_errors)
    _print_scorecard(report.rankings["out_of_fold"], report.injected)
    print(f"  {report.files[-1]}")
    return EXIT_OK


def _print_scorecard(table, score: dict, *, shown: int = 5) -> None:
    """The known errors in the top N and the AUROC (when there are any), then the top suspects."""
    n = score["n"]
    if n:
        auroc = "n/a" if score["auroc"] is None else f"{score['auroc']:.3f}"
        print(f"label issues: the {n} injected errors, {score['in_top_n']} of them in the top {n} "
              f"(precision {score['precision']:.2f}); AUROC of the ranking {auroc}")
    for row in table.slice(0, shown).to_pylist():
        bad = row["image_id"] in score["image_ids"]
        print(f"  #{row['rank']:<3} image {row['image_id']:<8} {row['issue_kind'] or '-':<14}"
              f" {'injected error' if bad else '':<15} {row['file_name']}")


def _report(args) -> int:
    if args.top < 0:
        print(f"kfold-ray: error: --top must be >= 0, got {args.top}", file=sys.stderr)
        return EXIT_BAD_INPUT
    report = _api.report_run(args.run_dir, top=args.top, calibrate=args.calibrate)
    oof = report.rankings["out_of_fold"]
    flagged = sum(oof.column("is_issue").to_pylist())
    print(f"cleanlab flags {flagged} of {oof.num_rows} images as likely mislabelled")
    _print_scorecard(oof, report.injected, shown=min(5, args.top))
    for location in report.files:
        print(f"  {location}")
    return EXIT_OK


def _doctor(args) -> int:
    checkup = _api.doctor(args.address, args.storage)
    for line in checkup.lines():
        print(line)
    return EXIT_FAILED if checkup.problems else EXIT_OK
def _export(args) -> int:
    done = _api.export_for_review(args.run_dir, to=args.to, out=args.out, top=args.top,
                                  min_score=args.min_score, image_url=args.image_url,
                                  annotations=args.annotations, image_root=args.images)
    print(f"exported the {done.suspects} worst images for {args.to}:")
    for location in done.files:
        print(f"  {location}")
    return EXIT_OK


def _apply(args) -> int:
    fixed = _api.apply_fixes(args.annotations, args.fixes, out=args.out)
    counts: dict[str, int] = {}
    for c in fixed.changes:
        counts[c["change"]] = counts.get(c["change"], 0) + 1
    said = ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items())) or "no change"
    print(f"{fixed.reviewed_images} reviewed images: {said}")
    for c in fixed.changes[:50]:
        print(f"  image {c['image_id']} annotation {c['annotation_id']}: {c['change']}"
              + (f" {c['before']} -> {c['after']}" if c["before"] and c["after"] else
                 f" {c['before'] or c['after']}"))
    if len(fixed.changes) > 50:
        print(f"  ... and {len(fixed.changes) - 50} more")
    print(f"  {fixed.annotations}")
    print(f"  {fixed.changes_csv}")
    return EXIT_OK


def _print_summary(result) -> None:
    pooled = result.metrics.get("pooled", {})
    print(f"done: out-of-fold predictions for {result.dataset.num_images} images in {result.run_dir}")
    if pooled:
        print("pooled out-of-fold AP {:.3f}, AP50 {:.3f}".format(pooled.get("AP", float("nan")),
                                                                pooled.get("AP50", float("nan"))))
    for location in result.output_files():
        print(f"  {location}")


if __name__ == "__main__":
    sys.exit(main())
