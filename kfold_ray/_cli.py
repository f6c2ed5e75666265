"""Command line: ``kfold-ray run | validate | example | report``.

Exit codes: 0 success; 2 bad input or usage (one line on stderr, no traceback); 1 a failure
during the run (a fold that failed for good, ...). Flags map one-to-one onto `run_cv`'s options.
Each command calls one function of `kfold_ray._api`; this module only parses flags and prints.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from . import _api
from ._api import CALIBRATE_DEFAULT, EXAMPLE_MAX_ITER
from ._config import DEFAULT_MODEL, SPLITS
from ._exceptions import USER_INPUT_ERRORS, KfoldRayError, one_line

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # usage errors: one line, exit 2
        self.exit(EXIT_BAD_INPUT, f"kfold-ray: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kfold-ray", description="Out-of-fold Detectron2 predictions for a COCO dataset, on Ray.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="K-fold train + predict; write outputs to the run dir")
    _dataset_args(run)
    _run_args(run)

    val = sub.add_parser("validate", help="check a dataset (and a k) without running anything")
    _dataset_args(val)
    val.add_argument("-k", type=int, default=None, help="also check that this many folds fit")
    val.add_argument("--split", default="kfold", choices=SPLITS)
    val.add_argument("--group-field", default=None, help="image field holding the group (split=group)")

    ex = sub.add_parser("example", help="run the whole pipeline on the built-in digits example")
    ex.add_argument("--run-dir", default="runs/example",
                    help="a path, or a URI on a cluster: the example data then goes beside it "
                         "(<run-dir>-data) in the same storage, where every node reads it")
    ex.add_argument("--images", type=int, default=150, help="number of example images")
    ex.add_argument("-k", type=int, default=3)
    ex.add_argument("--max-iter", type=int, default=EXAMPLE_MAX_ITER, help="training iterations per fold")
    ex.add_argument("--gpus-per-fold", type=float, default=1.0)
    ex.add_argument("--resume", action="store_true")
    ex.add_argument("--address", default=None, help="Ray cluster address (as for run)")

    doc = sub.add_parser("doctor", help="check every node of the cluster: torch, CUDA, driver, "
                                        "GPUs, Detectron2's build, CPUs, the run's storage")
    doc.add_argument("--address", default=None,
                     help="Ray cluster address (as for run; default: RAY_ADDRESS, else the cluster "
                          "on this node, else a new local one)")
    doc.add_argument("--storage", default=None, metavar="URI",
                     help="also check that every node reaches this run dir or bucket (path or URI)")

    rep = sub.add_parser("report", help="rank likely label errors of a finished run; write report/index.html")
    rep.add_argument("run_dir", metavar="RUN_DIR", help="a finished run's folder (path or URI)")
    rep.add_argument("--top", type=int, default=20, help="suspect images shown on the page (default 20)")
    rep.add_argument("--calibrate", action=argparse.BooleanOptionalAction, default=CALIBRATE_DEFAULT,
                     help="score with per-class calibrated detection scores, each fold's mapped by a "
                          "calibration fitted on the other folds' images (default: "
                          f"{'on' if CALIBRATE_DEFAULT else 'off'}; benchmarks/README.md)")
    return parser


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
    p.add_argument("--model", default=DEFAULT_MODEL, help="model-zoo name, YAML path, or preset 'tiny'")
    p.add_argument("--opts", nargs="+", default=[], metavar="KEY VALUE",
                   help="Detectron2 config overrides, e.g. --opts SOLVER.MAX_ITER 2000")
    p.add_argument("--gpus-per-fold", type=float, default=1.0)
    p.add_argument("--cpus-per-fold", type=float, default=None,
                   help="CPUs per fold (default: its share of its node's CPUs per GPU; 1 per worker without GPUs)")
    p.add_argument("--workers-per-fold", type=int, default=None,
                   help="processes that train each fold data-parallel (Ray Train DDP; gloo on CPU); "
                        "SOLVER.IMS_PER_BATCH is their total batch (default: the fold's whole GPUs, else 1)")
    p.add_argument("--workers-across-nodes", action="store_true",
                   help="let a multi-GPU fold's workers spread over several nodes (default: one "
                        "node per fold, so only nodes with that many GPUs host it)")
    p.add_argument("--split", default="kfold", choices=SPLITS)
    p.add_argument("--group-field", default=None, help="image field holding the group (split=group)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8, help="held-out images per inference call")
    p.add_argument("--score-threshold", type=float, default=0.05)
    p.add_argument("--no-amp", dest="amp", action="store_false", help="no mixed precision on GPU")
    p.add_argument("--max-retries", type=int, default=2)
    p.add_argument("--checkpoint-period", type=int, default=None,
                   help="training iterations between checkpoints (default: the model config's)")
    p.add_argument("--keep-checkpoints", type=int, default=2,
                   help="newest checkpoints kept per fold (default 2)")
    p.add_argument("--address", default=None,
                   help="Ray cluster address; 'local' starts a new local cluster (default: RAY_ADDRESS, "
                        "else the cluster running on this node, else a new local one)")
    p.add_argument("--resume", action="store_true", help="finish an interrupted run in --run-dir")
    p.add_argument("--quiet", action="store_true", help="no progress output")


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
        exclude_unreadable=args.exclude_unreadable,
    )
    _print_summary(result)
    return EXIT_OK


def _example(args) -> int:
    run_dir = args.run_dir.rstrip("/")
    data = _api.example_data(run_dir, n_images=args.images)
    print(f"example dataset: {data.annotations} ({args.images} images, injected label errors "
          f"listed in {data.injected_errors})")
    result = _api.run_example(data, run_dir=run_dir, k=args.k, max_iter=args.max_iter,
                              gpus_per_fold=args.gpus_per_fold, resume=args.resume,
                              address=args.address)
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
