"""Held-out inference: images decoded ahead in a thread, the model called on batches of
same-size images, Detectron2 Instances turned into Arrow batches on the CPU (they never leave
the actor), each carrying the fold model's losses on the images' given boxes (`_losses`); on a
GPU out-of-memory the rest of the fold goes on at half the batch."""

from __future__ import annotations

import logging
import queue
import threading
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


def predict(model, cfg, task: FoldTask, dataset: CocoDataset, device: str, *,
             indices: np.ndarray | None = None, batch_size: int | None = None,
             already: int = 0, model_id: str = "") -> Iterator[FoldEvent]:
    """Batched held-out inference: images decoded ahead in a thread, the model called on lists."""
    import torch

    model.eval()
    indices = np.asarray(task.predict_indices if indices is None else indices, dtype=np.int64)
    batch_size = batch_size or task.predict.batch_size
    ordered = by_size(dataset, indices)
    batches = [ordered[i:i + batch_size] for i in range(0, len(ordered), batch_size)]
    use_amp = task.predict.amp and device == "cuda"
    with_losses = supports_box_losses(model)
    done, total = already, already + len(indices)
    for batch_indices, inputs in _prefetch(batches, dataset, cfg):
        losses = None
        with torch.inference_mode(), torch.autocast("cuda", enabled=use_amp):
            if with_losses:  # the given boxes scored on the same features (loss inspection)
                outputs, losses = predict_with_box_losses(model, inputs, batch_indices, dataset)
            else:
                outputs = model(inputs)
        batch = _to_record_batch(task.fold, batch_indices, outputs, dataset, model_id)
        yield batch if losses is None else with_box_losses(batch, losses)
        done += len(batch_indices)
        yield Progress(task.fold, "predict", done, total)


def _prefetch(batches: Sequence[np.ndarray], dataset: CocoDataset, cfg, depth: int = 2):
    """Yield (indices, model inputs) with the next batches decoded in a background thread."""
    loader = _InputLoader(cfg)
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        # A bounded put that gives up once the consumer is gone (generator closed early),
        # so the thread never blocks forever on a full queue.
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for b in batches:
                if not put((b, [loader(dataset, int(i)) for i in b])):
                    return
        except BaseException as e:  # surfaced in the consumer
            put(e)
            return
        put(None)

    thread = threading.Thread(target=work, name="kfold-ray-prefetch", daemon=True)
    thread.start()
    try:
        while (item := q.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


class _InputLoader:
    """Decode + resize one image the way DefaultPredictor does (same transform, same format)."""

    def __init__(self, cfg) -> None:
        import detectron2.data.transforms as T

        self.format = cfg.INPUT.FORMAT
        self.aug = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)

    def __call__(self, dataset: CocoDataset, index: int) -> dict[str, Any]:
        import torch
        from detectron2.data.detection_utils import read_image

        image = read_image(str(dataset.image_path(index)), format=self.format)
        h, w = image.shape[:2]
        resized = self.aug.get_transform(image).apply_image(image)
        tensor = torch.as_tensor(np.ascontiguousarray(resized.transpose(2, 0, 1)))
        return {"image": tensor, "height": h, "width": w}


def _to_record_batch(fold: int, indices: np.ndarray, outputs: list[dict], dataset: CocoDataset,
                     model_id: str = ""):
    """Detectron2 Instances -> one Arrow batch, on the CPU (Instances never leave the actor)."""
    boxes, scores, classes, owner = [], [], [], []
    for i, out in zip(indices.tolist(), outputs):
        inst = out["instances"].to("cpu")
        n = len(inst)
        boxes.append(inst.pred_boxes.tensor.float().numpy().reshape(n, 4))
        scores.append(inst.scores.float().numpy())
        classes.append(inst.pred_classes.numpy())
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
