"""Checkpoint uploads and the step loop: a slow run dir (each upload takes ``--upload-s``) with
uploads in the background (now) vs in the step loop (before), against a run dir without delay.

`kfold_ray.detectron2._train.train` steps the trainer and hands each new checkpoint to
`CheckpointSync.push_in_background`; "before" is the same loop with the upload made in the
loop's own thread (`push`), as it was. A ~330 MB R50 checkpoint takes seconds to reach S3 (and
with DDP every rank waits at the next all-reduce): here the upload sleeps ``--upload-s`` in the
run dir's ``put_file``. Same config, data and process, modes interleaved, best of ``--repeats``;
per-step times are wall time between the loop's progress events.

    .venv/bin/python benchmarks/bench_checkpoint_upload.py              # CPU, tiny model, ~3 min here
    .venv/bin/python benchmarks/bench_checkpoint_upload.py --model COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml \\
        --size 640 --iters 100 --checkpoint-period 20 --batch 8 --upload-s 5          # GPU
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def run(cfg, work_dir: Path, scratch: Path, *, upload_s: float, in_loop: bool) -> dict:
    from kfold_ray.detectron2._train import train
    from kfold_ray.storage._checkpoints import CheckpointSync
    from kfold_ray.storage._storage import Storage

    class SlowStorage(Storage):
        def put_file(self, local, name):
            if name.startswith("model_"):
                time.sleep(upload_s)
            super().put_file(local, name)

    blocked = {"in the loop": 0.0, "final": 0.0}

    class Timed(CheckpointSync):
        """Seconds the loop's own thread spends in the checkpoint calls: during training
        (``push_in_background``) and for the final checkpoint (``push``, before predicting).
        Time blocked on a sleeping upload does not depend on how loaded the CPU is."""

        def push_in_background(self):
            t = time.perf_counter()
            try:
                return (CheckpointSync.push if in_loop else CheckpointSync.push_in_background)(self)
            finally:
                blocked["in the loop"] += time.perf_counter() - t

        def push(self):
            t = time.perf_counter()
            try:
                return super().push()
            finally:
                blocked["final"] += time.perf_counter() - t

    sync = Timed(SlowStorage(work_dir), scratch, keep=2)  # in_loop: before, the loop waits for each upload
    sync.pull()
    cfg.defrost()
    cfg.OUTPUT_DIR = str(scratch)
    start = last = time.perf_counter()
    steps = []
    for event in train(cfg, 0, sync):
        now = time.perf_counter()
        if event.loss is not None:
            steps.append(now - last)
        last = now
    total = time.perf_counter() - start
    stored = Storage(work_dir).read_text("last_checkpoint").strip()
    assert stored == "model_final.pth", stored
    return {"total": total, "median": statistics.median(steps), "max": max(steps),
            "blocked": blocked["in the loop"], "final": blocked["final"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny")
    p.add_argument("--opts", nargs="*", default=[])
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--checkpoint-period", type=int, default=5)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--upload-s", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()

    import numpy as np
    import torch

    from kfold_ray._config import TrainConfig
    from kfold_ray.data._dataset import load_coco
    from kfold_ray.data._example import make_digits_example
    from kfold_ray.detectron2 import Detectron2Backend
    from kfold_ray.detectron2._config import import_detectron2
    from kfold_ray.detectron2._data import register_split

    import_detectron2()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    modes = {"run dir without delay": (0.0, False),
             f"+{args.upload_s:g} s/upload, in background (now)": (args.upload_s, False),
             f"+{args.upload_s:g} s/upload, in the step loop (before)": (args.upload_s, True)}
    best: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        ex = make_digits_example(Path(tmp) / "data", n_images=args.images, image_size=args.size)
        dataset = load_coco(ex.annotations_path, ex.image_dir)
        name = register_split("bench_ckpt", dataset, np.arange(dataset.num_images))
        train = TrainConfig(model=args.model, overrides=(
            "SOLVER.IMS_PER_BATCH", str(args.batch), "SOLVER.MAX_ITER", str(args.iters),
            "MODEL.WEIGHTS", "", *args.opts))
        for r in range(args.repeats):
            for mode, (upload_s, in_loop) in modes.items():
                cfg = Detectron2Backend().build_cfg(
                    train, num_classes=dataset.num_classes, device=device, dataset_name=name,
                    checkpoint_period=args.checkpoint_period, num_workers=0,
                    output_dir=str(Path(tmp) / "unused"))
                key = f"{r}-{len(best)}-{mode[:3]}"
                out = run(cfg, Path(tmp) / "runs" / key, Path(tmp) / "scratch" / key,
                          upload_s=upload_s, in_loop=in_loop)
                if mode not in best or out["total"] < best[mode]["total"]:
                    best[mode] = out
    checkpoints = len(range(args.checkpoint_period - 1, args.iters - 1, args.checkpoint_period)) + 1
    print(f"{device}, model {args.model}, {args.size} px, batch {args.batch}, {args.iters} "
          f"iterations, {checkpoints} checkpoints (every {args.checkpoint_period} + final), "
          f"best of {args.repeats}")
    base = best["run dir without delay"]
    for mode, r in best.items():
        print(f"  {mode:42s} {r['total']:7.2f} s ({r['total'] / base['total']:5.2f}x)  "
              f"median step {1000 * r['median']:6.0f} ms  slowest step {1000 * r['max']:6.0f} ms  "
              f"{args.iters * args.batch / r['total']:6.2f} img/s  loop blocked on checkpoints "
              f"{r['blocked']:5.2f} s (+ final {r['final']:4.2f} s)")


if __name__ == "__main__":
    main()
