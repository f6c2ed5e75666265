"""Held-out inference: images read, decoded and resized by a pool of threads sized from the
fold's CPUs and assembled into batches in a fixed order, the model called on batches of
same-size images with only its box outputs kept (no mask pasting), Detectron2 Instances turned
into Arrow batches on the CPU (they never leave the actor), each carrying the fold model's
losses on the images' given boxes (`_losses`); on a GPU out-of-memory the rest of the fold goes
on at half the batch."""

from __future__ import annotations

import collections
import contextlib
import logging
import math
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Iterator, Sequence

import numpy as np

from .._backend import FoldEvent, FoldTask, Progress
from .._exceptions import FoldOutOfMemoryError
from .._schema import batch_image_indices, make_prediction_batch, with_box_losses
from ..data._dataset import CocoDataset
from ._losses import predict_with_box_losses, supports_box_losses


def predict_halving_on_oom(model, cfg, task: FoldTask, dataset: CocoDataset,
                            device: str, *, model_id: str = "") -> Iterator[FoldEvent]:
    """`predict`, and on a GPU out-of-memory the rest of the fold again at half the batch size
    (down to 1, then FoldOutOfMemoryError). Batches already streamed stay persisted."""
    import torch

    remaining = np.asarray(task.predict_indices, dtype=np.int64)
    batch_size, total = task.predict.batch_size, len(remaining)
    while True:
        done: list[np.ndarray] = []
        try:
            for event in predict(model, cfg, task, dataset, device, indices=remaining,
                                  batch_size=batch_size, already=total - len(remaining),
                                  model_id=model_id):
                if not isinstance(event, Progress):
                    done.append(batch_image_indices(event))
                yield event
            return
        except torch.cuda.OutOfMemoryError:
            if batch_size == 1:
                raise FoldOutOfMemoryError(
                    task.fold, "predicting", 1,
                    "even one image at a time does not fit: lower INPUT.MAX_SIZE_TEST, or raise "
                    "--gpus-per-fold so fewer folds share a GPU",
                ) from None
        torch.cuda.empty_cache()
        remaining = np.setdiff1d(remaining, np.concatenate([np.empty(0, np.int64), *done]))
        batch_size //= 2
        logging.getLogger("detectron2.kfold_ray").warning(
            "kfold-ray fold %d: out of GPU memory while predicting; the remaining %d images go on "
            "at batch size %d", task.fold, len(remaining), batch_size)


def by_size(dataset: CocoDataset, indices: np.ndarray) -> np.ndarray:
    """Held-out images ordered by (height, width, index): a batch holds images of one size where
    it can, so padding, and hence predictions, do not depend on how the images were batched."""
    return indices[np.lexsort((indices, dataset.widths[indices], dataset.heights[indices]))]


def input_threads(num_cpus: float) -> int:
    """Threads that read, decode and resize a fold's held-out images: 4 per reserved CPU.

    Decoding and resizing (Pillow) release the GIL, so threads use every CPU the fold reserved;
    more threads than CPUs keep them busy while reads wait on storage (an image on S3 costs two
    requests, each waiting ~20-40 ms for its first byte: several times a 640x480 JPEG's decode).
    Measured in benchmarks/bench_heldout_input.py.
    """
    return max(2, min(64, 4 * math.ceil(max(num_cpus, 0.0))))


def predict(model, cfg, task: FoldTask, dataset: CocoDataset, device: str, *,
             indices: np.ndarray | None = None, batch_size: int | None = None,
             already: int = 0, model_id: str = "", threads: int | None = None,
             ) -> Iterator[FoldEvent]:
    """Batched held-out inference: images read and decoded ahead by a thread pool (``threads``,
    default `input_threads` of the fold's CPUs), the model called on lists, boxes kept."""
    import torch

    model.eval()
    indices = np.asarray(task.predict_indices if indices is None else indices, dtype=np.int64)
    batch_size = batch_size or task.predict.batch_size
    ordered = by_size(dataset, indices)
    batches = [ordered[i:i + batch_size] for i in range(0, len(ordered), batch_size)]
    use_amp = task.predict.amp and device == "cuda"
    with_losses = supports_box_losses(model)
    done, total = already, already + len(indices)
    inputs_ahead = prefetch(batches, dataset, cfg, threads=threads or input_threads(task.num_cpus),
                            device=device)
    for batch_indices, inputs in inputs_ahead:
        losses = None
        with torch.inference_mode(), torch.autocast("cuda", enabled=use_amp), boxes_only(model):
            if with_losses:  # the given boxes scored on the same features (loss inspection)
                outputs, losses = predict_with_box_losses(model, inputs, batch_indices, dataset)
            else:
                outputs = model(inputs)
        batch = _to_record_batch(task.fold, batch_indices, outputs, dataset, model_id)
        yield batch if losses is None else with_box_losses(batch, losses)
        done += len(batch_indices)
        yield Progress(task.fold, "predict", done, total)


def prefetch(batches: Sequence[np.ndarray], dataset: CocoDataset, cfg, *, threads: int,
             device: str = "cpu") -> Iterator[tuple[np.ndarray, list[dict[str, Any]]]]:
    """Yield (indices, model inputs) of ``batches`` in their order, each image read, decoded and
    resized by a pool of ``threads``, at least two batches (and 2 x threads images) ahead.

    The order of the batches and of the images in them is the order given, whatever the thread
    that decoded them, so a retry predicts the same batches. On CUDA each image is copied to
    pinned memory in its thread, then to the GPU without blocking.
    """
    if not batches:
        return
    loader = _InputLoader(cfg, pin=device == "cuda")
    ahead = max(2, math.ceil(2 * threads / max(1, len(batches[0]))))
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="kfold-ray-input")
    pending: collections.deque[tuple[np.ndarray, list[Future]]] = collections.deque()
    todo = iter(batches)

    def submit_next() -> None:
        batch = next(todo, None)
        if batch is not None:
            pending.append((batch, [pool.submit(loader, dataset, int(i)) for i in batch]))

    try:
        for _ in range(ahead):
            submit_next()
        while pending:
            batch, futures = pending.popleft()
            submit_next()
            inputs = [f.result() for f in futures]  # an image's error surfaces here, in order
            if device == "cuda":
                for inp in inputs:
                    inp["image"] = inp["image"].to(device, non_blocking=True)
            yield batch, inputs
    finally:  # also when the consumer stops early (out of memory, generator closed)
        pool.shutdown(wait=False, cancel_futures=True)


@contextlib.contextmanager
def boxes_only(model) -> Iterator[None]:
    """The model's mask and keypoint heads off while it predicts: only boxes, scores and classes
    are kept, so Mask R-CNN neither runs its mask head nor pastes each detection's mask at full
    image resolution (100 x 640 x 480 bytes, ~30 MB, per image) nor copies it to the CPU.

    Detectron2's ROI heads skip a head whose ``mask_on`` / ``keypoint_on`` is False in eval
    mode, and its postprocessing pastes only masks that are there.
    """
    heads = getattr(model, "roi_heads", None)
    switched = [name for name in ("mask_on", "keypoint_on") if getattr(heads, name, False)]
    for name in switched:
        setattr(heads, name, False)
    try:
        yield
    finally:
        for name in switched:
            setattr(heads, name, True)


class _InputLoader:
    """Read + decode + resize one image the way DefaultPredictor does (same transform, same
    format); in pinned memory when ``pin`` (CUDA), so that its copy to the GPU is asynchronous."""

    def __init__(self, cfg, *, pin: bool = False) -> None:
        import detectron2.data.transforms as T

        self.format = cfg.INPUT.FORMAT
        self.pin = pin
        self.aug = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)

    def __call__(self, dataset: CocoDataset, index: int) -> dict[str, Any]:
        import torch
        from detectron2.data.detection_utils import read_image

        image = read_image(str(dataset.image_path(index)), format=self.format)
        h, w = image.shape[:2]
        resized = self.aug.get_transform(image).apply_image(image)
        tensor = torch.as_tensor(np.ascontiguousarray(resized.transpose(2, 0, 1)))
        if self.pin:
            tensor = tensor.pin_memory()
        return {"image": tensor, "height": h, "width": w}


def _to_record_batch(fold: int, indices: np.ndarray, outputs: list[dict], dataset: CocoDataset,
                     model_id: str = ""):
    """Detectron2 Instances -> one Arrow batch, on the CPU (Instances never leave the actor).

    Only the three fields kept are copied to the CPU (``Instances.to`` would copy every field)."""
    boxes, scores, classes, owner = [], [], [], []
    for i, out in zip(indices.tolist(), outputs):
        inst = out["instances"]
        n = len(inst)
        boxes.append(inst.pred_boxes.tensor.float().cpu().numpy().reshape(n, 4))
        scores.append(inst.scores.float().cpu().numpy())
        classes.append(inst.pred_classes.cpu().numpy())
        owner.append(np.full(n, i, dtype=np.int64))
    return make_prediction_batch(
        fold=fold,
        image_indices=indices,
        det_image_index=np.concatenate(owner) if owner else np.zeros(0, np.int64),
        boxes=np.concatenate(boxes) if boxes else np.zeros((0, 4), np.float32),
        scores=np.concatenate(scores) if scores else np.zeros(0, np.float32),
        classes=np.concatenate(classes) if classes else np.zeros(0, np.int32),
        image_ids=dataset.image_ids,
        category_ids=dataset.category_ids,
        model=model_id,
    )
