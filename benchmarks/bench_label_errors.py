"""Label errors injected after Schubert et al. 2023 (DROP / FLIP / SHIFT / SPAWN, 5 % of the
given boxes each; `label_error_protocol.py`), found by kfold-ray's per-box and per-image rankings.

    # the digits (kfold_ray.data._example, clean labels), the example's budget (tiny, 150 iters):
    python benchmarks/bench_label_errors.py --dataset digits --images 420 --seed 0 \\
        --out runs/label-errors/digits-s0-i150
    # a larger CPU budget (twice the example's iterations; ~20 min on 2 cores):
    python benchmarks/bench_label_errors.py --dataset digits --images 420 --seed 0 \\
        --max-iter 300 --checkpoint-period 50 --out runs/label-errors/digits-s0-i300
    # a COCO dataset on disk (BCCD: blood-cell photographs, MIT licence), its own labels as truth:
    python benchmarks/bench_label_errors.py --dataset PATH/bccd/annotations.json \\
        --image-root PATH/bccd --out runs/label-errors/bccd -k 3 --max-iter 200 --checkpoint-period 25 \\
        --opts SOLVER.STEPS "(160,)" INPUT.MIN_SIZE_TRAIN "(256,)" INPUT.MAX_SIZE_TRAIN 342 \\
        INPUT.MIN_SIZE_TEST 256 INPUT.MAX_SIZE_TEST 342
    # --train-only trains (or resumes) and leaves the scoring for later; score a finished run
    # again (no training), e.g. after a change to the ranking:
    python benchmarks/bench_label_errors.py --out runs/label-errors/digits-s0-i150 --score-only

Each --out holds data/ (the corrupted annotations.json, annotations_clean.json,
injected_errors.json; the digits' images) and run/ (a kfold-ray run dir: an interrupted run
resumes where it stopped). Results: OUT/results.json and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.label_error_protocol import inject_errors  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    data = args.out / "data"
    if not args.score_only:
        annotations, image_root = _write_data(args, data)
        started = time.perf_counter()
        _train(args, annotations, image_root, args.out / "run")
        seconds = time.perf_counter() - started
        (args.out / "train_seconds.json").write_text(json.dumps({"seconds": round(seconds, 1)}))
        if args.train_only:
            return 0
    from benchmarks.label_error_scores import report

    results = report(args.out, exclude=args.exclude_negatives, bootstrap=args.bootstrap)
    results["command"] = " ".join(shlex.quote(a) for a in sys.argv)
    name = "results.json" if not args.exclude_negatives else "results_excluded.json"
    (args.out / name).write_text(json.dumps(results, indent=2) + "\n")
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="data + run dir of this benchmark run")
    p.add_argument("--dataset", default="digits",
                   help="'digits' (generated), or a COCO json whose labels are taken as the truth")
    p.add_argument("--image-root", type=Path, default=None, help="with a COCO json: its image folder")
    p.add_argument("--images", type=int, default=420, help="digits: number of images")
    p.add_argument("--seed", type=int, default=0, help="the digits and the injected errors")
    p.add_argument("-k", type=int, default=3)
    p.add_argument("--model", default="tiny")
    p.add_argument("--max-iter", type=int, default=150, help="default: the example's budget")
    p.add_argument("--opts", nargs="*", default=[], metavar="KEY VALUE", help="more Detectron2 overrides")
    p.add_argument("--cpus-per-fold", type=float, default=None,
                   help="as for kfold-ray run (0.5 on 2 cores: every fold of k=3 at once)")
    p.add_argument("--checkpoint-period", type=int, default=None,
                   help="iterations between the folds' checkpoints (default: the model config's, "
                        "5000: none in a short run); e.g. 25 for a run that may be stopped and resumed")
    p.add_argument("--score-only", action="store_true", help="score the finished run in --out")
    p.add_argument("--train-only", action="store_true", help="train (or resume), score later")
    p.add_argument("--exclude-negatives", type=Path, default=None,
                   help="a text file of image file names (one a line) left out of the negatives "
                        "(e.g. images judged to hold real label errors)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the intervals")
    return p


def _write_data(args, data: Path) -> tuple[Path, Path]:
    """The corrupted annotations (written once; the same arguments give the same bytes)."""
    annotations = data / "annotations.json"
    if args.dataset == "digits":
        from kfold_ray.data._example import make_digits_example

        example = make_digits_example(data, n_images=args.images, seed=args.seed, corrupt_fraction=0.0)
        clean, image_root = json.loads(example.clean_annotations_path.read_text()), example.image_dir
    else:
        if args.image_root is None:
            raise SystemExit("--image-root is needed with a COCO json")
        clean, image_root = json.loads(Path(args.dataset).read_text()), args.image_root.resolve()
        data.mkdir(parents=True, exist_ok=True)
        (data / "annotations_clean.json").write_text(json.dumps(clean))
    corrupted, records = inject_errors(clean, args.seed)
    (data / "injected_errors.json").write_text(json.dumps(records, indent=1) + "\n")
    text = json.dumps(corrupted)
    if not annotations.is_file() or annotations.read_text() != text:
        annotations.write_text(text)
    (data / "image_root.txt").write_text(str(image_root) + "\n")
    return annotations, Path(image_root)


def _train(args, annotations: Path, image_root: Path, run_dir: Path) -> None:
    import ray

    from kfold_ray import run_cv
    from kfold_ray.data._example import example_overrides

    run_cv(annotations, args.k, image_root=image_root, model=args.model,
           overrides=[*example_overrides(args.max_iter), *args.opts], gpus_per_fold=0.0,
           cpus_per_fold=args.cpus_per_fold, checkpoint_period=args.checkpoint_period,
           run_dir=run_dir, address="local", resume=(run_dir / "run.json").is_file(),
           progress=sys.stderr.isatty())
    ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
