"""kfold-ray's ranking side by side with FiftyOne Brain's ``compute_mistakenness``, per kind of error.

Both rank the same images from the same out-of-fold predictions (a finished run dir): FiftyOne
Brain on a FiftyOne dataset loaded from kfold-ray's own FiftyOne export (``ground_truth`` = the
given labels, ``predictions`` = every out-of-fold prediction the run kept, ``confidence`` = its
score); kfold-ray by its default ranking (``box_score``, `kfold_ray.report._rank`) and its
earlier one (``combined_score``). The dataset's ``injected_errors.json`` (the example writes one) is the answer key.

Rankings (one score per image, higher = more likely wrong):

    ours: box_score       kfold-ray's default ranking (what `kfold-ray report` orders by)
    ours: combined        the earlier default (rank fractions of loss_score and unmatched_score)
    brain: mistakenness   the sample's ``mistakenness`` (max over its given boxes)
    brain: missing        the sample's ``possible_missing`` count (confident unmatched predictions)
    brain: loc            max over its given boxes of ``mistakenness_loc`` (a box's localization)
    brain: max            the largest of the three above, each as its rank fraction

Per kind of injected error (swapped, missing, shifted, spurious: those the dataset has) and for all of them: AUROC over the images
with that kind of error against the clean images, and P@N (precision among the N worst of those
images, N = images with that kind of error).

    python benchmarks/bench_mistakenness.py --run-dir runs/example            # an existing run
    python benchmarks/bench_mistakenness.py --run-dir runs/example-seed1 \\
        --seed 1 --train        # make the example at seed 1 (data + run) first if not finished

Needs FiftyOne (``pip install kfold-ray[review]``; it brings fiftyone-brain) and a MongoDB for it:
a normal FiftyOne install has one; here, the one scripts/setup.sh puts in .venv/opt/mongodb is
started for the benchmark. Results also go to RUN_DIR/bench_mistakenness.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

KINDS = ("swapped", "missing", "shifted", "spurious")  # those the dataset has are scored
RANKINGS = ("ours: box_score", "ours: combined", "brain: mistakenness", "brain: missing", "brain: loc", "brain: max")
MONGOD = Path(__file__).resolve().parents[1] / ".venv" / "opt" / "mongodb" / "bin" / "mongod"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.train:
        _train(args)
    from kfold_ray import open_run
    from kfold_ray.report._injected import injected_errors_of

    result = open_run(args.run_dir)
    injected = injected_errors_of(result.dataset)
    if not injected:
        sys.exit(f"{args.run_dir}: its dataset lists no injected errors (injected_errors.json)")
    started = time.perf_counter()
    ours = result.label_issues()
    ours_s = time.perf_counter() - started
    with _database():
        brain, brain_s = _brain_scores(args.run_dir, result)
    ids = [int(i) for i in result.image_ids]
    scores = {"ours: box_score": dict(zip(ours["image_id"], ours["box_score"])),
              "ours: combined": dict(zip(ours["image_id"], ours["combined_score"])), **brain}
    table = _score(ids, scores, injected)
    record = {"command": _command(), "run_dir": str(args.run_dir), "images": len(ids),
              "errors": {k: n for k in KINDS if (n := sum(e["kind"] == k for e in injected))},
              "seconds": {"ours": round(ours_s, 2), "brain": round(brain_s, 2)},
              "pooled_AP": result.metrics.get("pooled", {}).get("AP"), "table": table}
    _print(record)
    Path(args.run_dir, "bench_mistakenness.json").write_text(json.dumps(record, indent=2) + "\n")
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", type=Path, required=True, help="a finished run on a dataset with injected errors")
    p.add_argument("--train", action="store_true",
                   help="first make the built-in example (`kfold-ray example`) in --run-dir unless finished")
    p.add_argument("--seed", type=int, default=0, help="with --train: the example's seed (default 0)")
    p.add_argument("--gpus-per-fold", type=float, default=0.0, help="with --train (default 0: CPU)")
    return p


def _train(args) -> None:
    import ray

    from kfold_ray._api import example_data, run_example

    data = example_data(str(args.run_dir), seed=args.seed)
    resume = (args.run_dir / "run.json").is_file()
    run_example(data, run_dir=str(args.run_dir), gpus_per_fold=args.gpus_per_fold, seed=args.seed,
                resume=resume and json.loads((args.run_dir / "run.json").read_text())["status"] != "finished",
                address="local")
    ray.shutdown()


class _database:
    """FIFTYONE_DATABASE_URI for the benchmark: the caller's, else our own mongod for the run."""

    def __enter__(self):
        self.proc = None
        if os.environ.get("FIFTYONE_DATABASE_URI") or not MONGOD.is_file():
            return self
        self.tmp = tempfile.TemporaryDirectory(prefix="bench-mongod-")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.proc = subprocess.Popen([str(MONGOD), "--dbpath", self.tmp.name, "--bind_ip", "127.0.0.1",
                                      "--port", str(port), "--logpath", f"{self.tmp.name}/log"],
                                     stdout=subprocess.DEVNULL, start_new_session=True)
        for _ in range(120):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.5)
        os.environ.update(FIFTYONE_DATABASE_URI=f"mongodb://127.0.0.1:{port}",
                          FIFTYONE_DO_NOT_TRACK="true", FIFTYONE_DATABASE_VALIDATION="false")
        return self

    def __exit__(self, *exc):
        if self.proc is not None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=60)
            self.tmp.cleanup()


def _brain_scores(run_dir: Path, result) -> tuple[dict[str, dict[int, float]], float]:
    """Per image id, each Brain ranking, from compute_mistakenness on the run's predictions."""
    import fiftyone as fo
    import fiftyone.brain as fob

    from kfold_ray._api import export_for_review

    with tempfile.TemporaryDirectory(prefix="bench-fo-") as tmp:
        export_for_review(run_dir, to="fiftyone", out=f"{tmp}/fo", top=result.dataset.num_images,
                          min_score=0.0)
        ds = fo.Dataset.from_dir(f"{tmp}/fo", dataset_type=fo.types.FiftyOneDataset)
    try:
        started = time.perf_counter()
        fob.compute_mistakenness(ds, "predictions", label_field="ground_truth", progress=False)
        seconds = time.perf_counter() - started
        ids, mistakenness, missing, gts = ds.values(["coco_id", "mistakenness", "possible_missing",
                                                     "ground_truth.detections"])
    finally:
        ds.delete()
    loc = [max((d["mistakenness_loc"] or 0.0 for d in dets or [] if d.has_field("mistakenness_loc")),
               default=0.0) for dets in gts]
    out = {"brain: mistakenness": dict(zip(ids, [m or 0.0 for m in mistakenness])),
           "brain: missing": dict(zip(ids, [float(m or 0) for m in missing])),
           "brain: loc": dict(zip(ids, loc))}
    from kfold_ray.report._rank import rank_fraction

    stacked = np.stack([rank_fraction(np.array([out[k][i] for i in ids], dtype=float))
                        for k in ("brain: mistakenness", "brain: missing", "brain: loc")])
    out["brain: max"] = dict(zip(ids, stacked.max(axis=0)))
    return out, seconds


def _score(ids: list[int], scores: dict[str, dict[int, float]], injected: list[dict]) -> dict:
    from sklearn.metrics import roc_auc_score

    kind_of: dict[int, set[str]] = {}
    for e in injected:
        kind_of.setdefault(int(e["image_id"]), set()).add(str(e["kind"]))
    table: dict[str, dict] = {}
    present = {str(e["kind"]) for e in injected}
    for kind in (*[k for k in KINDS if k in present], "all"):
        pos = {i for i in ids if i in kind_of and (kind == "all" or kind in kind_of[i])}
        # Dataset order: a tie (Brain's missing count is 0 on most images) favours no side.
        keep = [i for i in ids if i in pos or i not in kind_of]
        y = np.array([i in pos for i in keep])
        row = {"n": len(pos)}
        for name in RANKINGS:
            s = np.array([float(scores[name].get(i, 0.0)) for i in keep])
            if not 0 < y.sum() < len(y):
                row[name] = {"auroc": None, "precision_at_n": None}
                continue
            top = np.argsort(-s, kind="stable")[: len(pos)]
            row[name] = {"auroc": round(float(roc_auc_score(y, s)), 3),
                         "precision_at_n": round(float(y[top].mean()), 3)}
        table[kind] = row
    return table


def _print(record: dict) -> None:
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    print(f"\n{record['run_dir']}: {record['images']} images, errors {record['errors']}, pooled AP "
          f"{fmt(record['pooled_AP'])}; ranking {record['seconds']['ours']} s (ours), "
          f"compute_mistakenness {record['seconds']['brain']} s")
    header = f"{'kind (n)':<14}" + "".join(f" {name:>21}" for name in RANKINGS)
    print(header + "\n" + " " * 14 + "".join(f" {'AUROC   P@N':>21}" for _ in RANKINGS))
    for kind, row in record["table"].items():
        print(f"{kind + ' (' + str(row['n']) + ')':<14}" + "".join(
            f" {fmt(row[n]['auroc']) + '   ' + fmt(row[n]['precision_at_n']):>21}" for n in RANKINGS))
    print(f"\ncommand: {record['command']}")


def _command() -> str:
    return " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])


if __name__ == "__main__":
    sys.exit(main())
