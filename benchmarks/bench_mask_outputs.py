"""Mask R-CNN held-out prediction: masks pasted and copied (before) vs boxes only (now).

kfold-ray keeps only boxes, scores and classes of each detection. Before, a Mask R-CNN fold still
ran its mask head, pasted every detection's 28x28 mask at full image resolution (Detectron2's
postprocessing: N x H x W bytes per image) and copied them to the CPU (`Instances.to("cpu")`);
now `kfold_ray.detectron2._predict.predict` turns the mask head off while it predicts
(`boxes_only`) and copies only the three fields it keeps. "before" is the same `predict` with
those two changes undone, nothing else. Each mode runs in a fresh child process (its peak RSS is
its own), on the same images with the same weights (seeded), interleaved best of ``--repeats``;
score threshold 0 and COCO's 80 classes, so each image has the 100 detections a trained COCO
model gives (``TEST.DETECTIONS_PER_IMAGE``).

    .venv/bin/python benchmarks/bench_mask_outputs.py                       # CPU, ~5 min here
    .venv/bin/python benchmarks/bench_mask_outputs.py --model COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def child(mode: str, args) -> dict:
    import torch

    import kfold_ray.detectron2._predict as P
    from kfold_ray._backend import FoldTask
    from kfold_ray._config import PredictConfig, TrainConfig
    from kfold_ray.data._dataset import load_coco
    from kfold_ray.detectron2 import Detectron2Backend
    from kfold_ray.detectron2._config import import_detectron2

    import_detectron2()
    from detectron2.modeling import build_model

    kept = {"mask_bytes": 0, "images": 0}
    if mode == "before":  # undo the two changes: masks on, every field copied to the CPU
        P.boxes_only = lambda model: contextlib.nullcontext()
        to_batch = P._to_record_batch

        def old_to_record_batch(fold, indices, outputs, dataset, model_id=""):
            cpu = [{"instances": out["instances"].to("cpu")} for out in outputs]
            for out in cpu:
                kept["mask_bytes"] += out["instances"].pred_masks.nbytes
            kept["images"] += len(cpu)
            return to_batch(fold, indices, cpu, dataset, model_id)

        P._to_record_batch = old_to_record_batch
    else:  # check that no mask leaves the model
        to_batch_now = P._to_record_batch

        def checked(fold, indices, outputs, dataset, model_id=""):
            assert not any(out["instances"].has("pred_masks") for out in outputs)
            return to_batch_now(fold, indices, outputs, dataset, model_id)

        P._to_record_batch = checked
    root = Path(args.data)
    dataset = load_coco(root / "annotations.json", root / "images")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    overrides = ("MODEL.MASK_ON", "True", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",
                 "INPUT.MIN_SIZE_TEST", str(args.height), "INPUT.MAX_SIZE_TEST", str(args.width),
                 *args.opts)
    cfg = Detectron2Backend().build_cfg(TrainConfig(model=args.model, overrides=overrides),
                                        num_classes=dataset.num_classes, device=device)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    task = FoldTask(run_name="bench", fold=0, attempt=0, train_indices=np.zeros(0, np.int64),
                    predict_indices=np.arange(dataset.num_images), work_dir="", seed=0,
                    num_cpus=args.cpus,
                    predict=PredictConfig(batch_size=args.batch_size, score_threshold=0.0))
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    seconds, detections = [], 0
    for _ in range(args.repeats):
        start = time.perf_counter()
        batches = [e for e in P.predict(model, cfg, task, dataset, device) if hasattr(e, "num_rows")]
        if device == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
        detections = sum(b.num_rows for b in batches)
    peak_gpu = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
    return {"mode": mode, "images": dataset.num_images, "best_s": min(seconds),
            "detections_per_image": detections / dataset.num_images,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "rss_before_predicting_mb": rss_before, "peak_gpu_mb": peak_gpu,
            "mask_mb_per_image": kept["mask_bytes"] / max(1, kept["images"]) / 2**20,
            "device": torch.cuda.get_device_name() if device == "cuda" else "CPU"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny")
    p.add_argument("--opts", nargs="*", default=[])
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--classes", type=int, default=80, help="COCO's 80: ~100 detections per image")
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--cpus", type=float, default=1)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args)), flush=True)
        return

    from bench_heldout_input import make_jpegs

    with tempfile.TemporaryDirectory() as tmp:
        make_jpegs(Path(tmp) / "data", args.images, args.width, args.height, args.classes)
        passed = [a for a in sys.argv[1:]]
        results = {}
        for mode in ("before", "after", "before", "after")[: 2 * max(1, min(args.repeats, 2))]:
            out = subprocess.run([sys.executable, __file__, *passed, "--child", mode,
                                  "--data", str(Path(tmp) / "data")],
                                 capture_output=True, text=True, check=True).stdout
            r = json.loads(next(l for l in out.splitlines() if l.startswith("RESULT "))[7:])
            if mode not in results or r["best_s"] < results[mode]["best_s"]:
                results[mode] = r
    b, a = results["before"], results["after"]
    n = b["images"]
    print(f"{b['device']}, model {args.model} + MASK_ON, {n} images {args.width}x{args.height}, "
          f"batch {args.batch_size}, {b['detections_per_image']:.0f} detections/image")
    for name, r in (("before: masks pasted + copied", b), ("now: boxes only", a)):
        gpu = f", peak GPU {r['peak_gpu_mb']:.0f} MB" if r["peak_gpu_mb"] is not None else ""
        print(f"  {name:30s} {1000 * r['best_s'] / n:7.1f} ms/image  {n / r['best_s']:6.2f} img/s  "
              f"peak RSS {r['peak_rss_mb']:6.0f} MB (+{r['peak_rss_mb'] - r['rss_before_predicting_mb']:.0f} "
              f"while predicting){gpu}")
    print(f"  masks kept per image before: {b['mask_mb_per_image']:.1f} MB; now: 0")
    print(f"  speed-up {b['best_s'] / a['best_s']:.2f}x")


if __name__ == "__main__":
    main()
