"""Training throughput: the fold's reserved CPUs as Detectron2 loader workers vs NUM_WORKERS 0.

A fold actor reserves ``cpus_per_fold`` CPUs (default: its share of its node's CPUs per GPU) and
Detectron2's training loader gets ``NUM_WORKERS = cpus - 1`` of them, unless the user set it.
With 0 workers the model waits for image decoding and augmentation in its own process. This
measures both in one process, same data, same model config, same seed:

    .venv/bin/python benchmarks/bench_loader.py                      # CPU: tiny model, 2 CPUs
    .venv/bin/python benchmarks/bench_loader.py --cpus 12 --model COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml \\
        --size 640 --iters 60 --batch 8                               # a GPU node

On the 2-core CPU machine the comparison is 1 loader worker vs none: the worker competes with
the model for the same two cores, so expect little gain there. The number that matters is on a
GPU node, where the model does not need the CPUs.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _train_rate(cfg, iters: int, warmup: int) -> float:
    """Images per second over ``iters`` iterations after ``warmup`` (Detectron2's own trainer)."""
    from detectron2.engine import DefaultTrainer
    from detectron2.utils.env import seed_all_rng
    from detectron2.utils.events import EventStorage

    seed_all_rng(cfg.SEED)
    trainer = DefaultTrainer(cfg)
    trainer.resume_or_load(resume=False)
    with EventStorage(0) as trainer.storage:
        for trainer.iter in range(warmup):
            trainer.run_step()
        start = time.perf_counter()
        for trainer.iter in range(warmup, warmup + iters):
            trainer.run_step()
        seconds = time.perf_counter() - start
    del trainer._trainer._data_loader_iter  # stop the loader workers
    return iters * cfg.SOLVER.IMS_PER_BATCH / seconds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--cpus", type=int, default=2, help="CPUs the fold reserves")
    ap.add_argument("--iters", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()

    import torch

    from kfold_ray._config import TrainConfig
    from kfold_ray.data._dataset import load_coco
    from kfold_ray.detectron2 import Detectron2Backend
    from kfold_ray.detectron2._data import register_split
    from kfold_ray.data._example import make_digits_example

    torch.set_num_threads(args.cpus)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        ex = make_digits_example(Path(tmp) / "data", n_images=args.images, image_size=args.size)
        dataset = load_coco(ex.annotations_path, ex.image_dir)
        import numpy as np

        name = register_split("bench_loader", dataset, np.arange(dataset.num_images))
        rates = {}
        for workers in (0, args.cpus - 1):
            train = TrainConfig(model=args.model, overrides=(
                "SOLVER.IMS_PER_BATCH", str(args.batch), "SOLVER.MAX_ITER", str(args.iters + args.warmup),
                "DATALOADER.NUM_WORKERS", str(workers), "MODEL.WEIGHTS", ""))
            cfg = Detectron2Backend().build_cfg(train, num_classes=dataset.num_classes, device=device,
                                                output_dir=str(Path(tmp) / f"out{workers}"),
                                                dataset_name=name, checkpoint_period=10**6)
            rates[workers] = _train_rate(cfg, args.iters, args.warmup)
    default = args.cpus - 1
    print(f"{device}, model {args.model}, {args.size} px, batch {args.batch}, {args.iters} iterations")
    print(f"NUM_WORKERS 0:               {rates[0]:7.1f} img/s")
    print(f"NUM_WORKERS {default} (cpus_per_fold {args.cpus} - 1): {rates[default]:7.1f} img/s "
          f"({rates[default] / rates[0]:.2f}x)")


if __name__ == "__main__":
    main()
