"""A fold's training: kfold-ray's loop vs Detectron2's DefaultTrainer.train(), and 2 DDP workers.

Same config, same images, same process, runs interleaved (best of --repeats): the ratio is what
counts; absolute times mean something only on a GPU.

    baseline   DefaultTrainer(cfg).train(): Detectron2's own loop, default loader, its hooks
    ours       kfold_ray.detectron2._train.train(): the same trainer stepped by kfold-ray's loop
               (seeded, progress yielded between steps, every checkpoint mirrored to a run dir
               through CheckpointSync), as every fold runs it
    run_cv     (--run-cv) one whole run_cv(k=2) on a local Ray cluster, 1 worker per fold vs 2
               DDP workers per fold (gloo on CPU; NCCL on GPUs): wall time of the whole run
    packing    (--packing, one GPU) run_cv(k=2) with gpus_per_fold 1 (the folds one after the
               other) vs 0.5 (both on the GPU at once): the ratio of wall times is the ratio of
               aggregate training + inference throughput

Training images/s = iterations x SOLVER.IMS_PER_BATCH / seconds of train() (model building
included for both, like a fold pays it).

    .venv/bin/python benchmarks/bench_training.py                          # CPU, tiny model
    .venv/bin/python benchmarks/bench_training.py --run-cv                 # + run_cv 1 vs 2 workers
    .venv/bin/python benchmarks/bench_training.py --model COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml \\
        --size 640 --iters 200 --opts MODEL.WEIGHTS "" SOLVER.IMS_PER_BATCH 8   # GPU (AMP on)
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def _cfg(args, dataset, out: Path, name: str):
    import torch

    from kfold_ray._config import TrainConfig
    from kfold_ray.detectron2._config import build_cfg

    device = "cuda" if torch.cuda.is_available() else "cpu"
    overrides = ("SOLVER.MAX_ITER", str(args.iters), "SOLVER.CHECKPOINT_PERIOD", str(args.checkpoint_period),
                 *args.opts)
    return build_cfg(TrainConfig(model=args.model, overrides=overrides, amp=True),
                     num_classes=dataset.num_classes, device=device, output_dir=str(out),
                     dataset_name=name, seed=0, num_workers=args.loader_workers)


def _baseline(cfg) -> float:
    from detectron2.engine import DefaultTrainer

    start = time.perf_counter()
    trainer = DefaultTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    _sync()
    return time.perf_counter() - start


def _ours(cfg, run_dir: Path) -> float:
    from kfold_ray.storage._checkpoints import CheckpointSync
    from kfold_ray.storage._storage import Storage
    from kfold_ray.detectron2._train import train

    sync = CheckpointSync(Storage(run_dir), cfg.OUTPUT_DIR)
    start = time.perf_counter()
    for _ in train(cfg, 0, sync):
        pass
    _sync()
    return time.perf_counter() - start


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _run_cv(args, root: Path, annotations: Path, images: Path, workers: int,
            gpus: float | None = None) -> float:
    import ray

    from kfold_ray import run_cv

    if gpus is None:
        gpus = float(workers) if _gpus() >= workers else 0.0  # one GPU per worker, else CPU
    ray.init(address="local", num_cpus=max(2, 2 * workers), include_dashboard=False,
             log_to_driver=False, configure_logging=False)
    try:
        start = time.perf_counter()
        run_cv(annotations, 2, image_root=images, model=args.model,
               overrides=["SOLVER.MAX_ITER", str(args.iters), *args.opts], gpus_per_fold=gpus,
               workers_per_fold=workers, run_dir=root / f"run-cv-{workers}w-{gpus:g}gpu",
               progress=False)
        return time.perf_counter() - start
    finally:
        ray.shutdown()


def _gpus() -> int:
    import torch

    return torch.cuda.device_count()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from kfold_ray.data._dataset import load_coco
    from kfold_ray.data._example import make_digits_example
    from kfold_ray.detectron2._config import import_detectron2
    from kfold_ray.detectron2._data import register_split
    from kfold_ray.detectron2._train import log_to_file

    import_detectron2()
    root = Path(tempfile.mkdtemp(prefix="kfold-ray-bench-training-"))
    ex = make_digits_example(root / "data", n_images=args.images, image_size=args.size)
    dataset = load_coco(ex.annotations_path, ex.image_dir)
    register_split("bench_train", dataset, np.arange(dataset.num_images), masks=False)
    log_to_file(root / "log.txt")  # both loops log to a file, not to the console
    times: dict[str, list[float]] = {"baseline": [], "ours": []}
    for r in range(args.repeats):
        for name in ("baseline", "ours") if r % 2 == 0 else ("ours", "baseline"):
            out = root / f"{name}-{r}"
            cfg = _cfg(args, dataset, out, "bench_train")
            times[name].append(_baseline(cfg) if name == "baseline" else _ours(cfg, root / f"run-{r}"))
    batch = _cfg(args, dataset, root / "probe", "bench_train").SOLVER.IMS_PER_BATCH
    rows = {name: {"seconds": min(t), "images_per_s": args.iters * batch / min(t)}
            for name, t in times.items()}
    rows["ours"]["vs_baseline"] = rows["ours"]["images_per_s"] / rows["baseline"]["images_per_s"]
    print(f"{'loop':<10} {'best s':>8} {'img/s':>8} {'vs baseline':>12}")
    for name, row in rows.items():
        print(f"{name:<10} {row['seconds']:>8.2f} {row['images_per_s']:>8.2f} "
              f"{row.get('vs_baseline', 1.0):>11.3f}x")
    if args.run_cv:
        one = _run_cv(args, root, ex.annotations_path, ex.image_dir, 1)
        two = _run_cv(args, root, ex.annotations_path, ex.image_dir, 2)
        rows["run_cv"] = {"one_worker_s": one, "two_workers_s": two, "speedup": one / two}
        print(f"run_cv k=2: 1 worker/fold {one:.1f} s, 2 workers/fold {two:.1f} s: {one / two:.2f}x")
    if args.packing:
        whole = _run_cv(args, root, ex.annotations_path, ex.image_dir, 1, gpus=1.0)
        half = _run_cv(args, root, ex.annotations_path, ex.image_dir, 1, gpus=0.5)
        rows["packing"] = {"one_gpu_per_fold_s": whole, "half_gpu_per_fold_s": half,
                           "aggregate_speedup": whole / half}
        print(f"run_cv k=2 on one GPU: 1 GPU/fold {whole:.1f} s, 0.5 GPU/fold {half:.1f} s: "
              f"{whole / half:.2f}x aggregate")
    (root / "bench_training.json").write_text(json.dumps({"args": vars(args), **rows}, indent=1))
    print(f"results: {root / 'bench_training.json'}")
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny")
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--iters", type=int, default=60)
    p.add_argument("--checkpoint-period", type=int, default=20)
    p.add_argument("--loader-workers", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--run-cv", action="store_true")
    p.add_argument("--packing", action="store_true", help="needs one GPU")
    p.add_argument("--opts", nargs="*", default=[])
    return p


if __name__ == "__main__":
    raise SystemExit(main())
