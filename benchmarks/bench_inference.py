"""Held-out inference: kfold-ray's batched path vs a DefaultPredictor loop, one image at a time.

Same model object, same images, same process; the ratio is what counts (absolute times mean
something only on a GPU). The baseline is what the seed notebook does: read each image from disk,
call ``DefaultPredictor`` on it, convert its Instances.

    .venv/bin/python benchmarks/bench_inference.py                      # CPU, tiny model
    .venv/bin/python benchmarks/bench_inference.py --model COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml \
        --opts MODEL.WEIGHTS "" --images 400 --size 640 --batch-size 8  # GPU
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np


def _dataset(root: Path, n: int, size: int):
    from kfold_ray.data._dataset import load_coco
    from kfold_ray.data._example import make_digits_example

    ex = make_digits_example(root, n_images=n, image_size=size)
    return load_coco(ex.annotations_path, ex.image_dir)


def _baseline(cfg, model, dataset) -> float:
    """The seed's loop: DefaultPredictor, one image at a time."""
    import torch
    from detectron2.data.detection_utils import read_image
    from detectron2.engine import DefaultPredictor

    predictor = DefaultPredictor(cfg)
    predictor.model = model  # same weights as ours
    start = time.perf_counter()
    for i in range(dataset.num_images):
        image = read_image(str(dataset.image_path(i)), format="BGR")
        inst = predictor(image)["instances"].to("cpu")
        _ = (inst.pred_boxes.tensor.numpy(), inst.scores.numpy(), inst.pred_classes.numpy())
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _ours(cfg, model, dataset, batch_size: int, device: str) -> float:
    import torch

    from kfold_ray._backend import FoldTask
    from kfold_ray._config import PredictConfig
    from kfold_ray.detectron2._predict import predict

    task = FoldTask(run_name="bench", fold=0, attempt=0, train_indices=np.zeros(0, np.int64),
                    predict_indices=np.arange(dataset.num_images), work_dir="", seed=0,
                    predict=PredictConfig(batch_size=batch_size, score_threshold=0.05))
    start = time.perf_counter()
    batches = sum(1 for ev in predict(model, cfg, task, dataset, device) if hasattr(ev, "num_rows"))
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    assert batches == -(-dataset.num_images // batch_size)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny")
    p.add_argument("--opts", nargs="*", default=[])
    p.add_argument("--images", type=int, default=96)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    args = p.parse_args()

    import torch
    from detectron2.modeling import build_model

    from kfold_ray._config import TrainConfig
    from kfold_ray.detectron2 import Detectron2Backend

    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        dataset = _dataset(Path(tmp), args.images, args.size)
        cfg = Detectron2Backend().build_cfg(TrainConfig(model=args.model, overrides=tuple(args.opts)),
                                            num_classes=dataset.num_classes, device=device)
        model = build_model(cfg).eval()
        _ours(cfg, model, dataset, args.batch_size, device)  # warm-up (allocator, autotuning)
        base = _baseline(cfg, model, dataset)
        ours = _ours(cfg, model, dataset, args.batch_size, device)
    n = dataset.num_images
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"device {name}, model {args.model}, {n} images of {args.size}px, batch {args.batch_size}")
    print(f"  DefaultPredictor loop : {n / base:8.1f} img/s")
    print(f"  kfold-ray batched     : {n / ours:8.1f} img/s")
    print(f"  speed-up              : {base / ours:8.2f}x")


if __name__ == "__main__":
    main()
