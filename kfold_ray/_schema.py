"""The one format predictions travel in: an Arrow record batch of detections, one row each.

A fold's backend yields these batches; the Ray stream carries them; the reducer persists,
checks and stitches them. A batch also says which images it covers (in its schema metadata),
because an image with no detection has no row but still has to be accounted for.

Columns (``DETECTION_SCHEMA``):
    image_index int64   position of the image in the dataset (json order)
    image_id    int64   COCO image id
    fold        int32   fold whose model (never trained on this image) made the prediction
    class_index int32   Detectron2 class index (rank of the category id)
    category_id int64   original COCO category id
    x1, y1, x2, y2 float32  absolute pixel box corners
    score       float32
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

DETECTION_SCHEMA = pa.schema(
    [
        ("image_index", pa.int64()),
        ("image_id", pa.int64()),
        ("fold", pa.int32()),
        ("class_index", pa.int32()),
        ("category_id", pa.int64()),
        ("x1", pa.float32()),
        ("y1", pa.float32()),
        ("x2", pa.float32()),
        ("y2", pa.float32()),
        ("score", pa.float32()),
    ]
)

_IMAGES_KEY = b"kfold_ray.image_indices"
_FOLD_KEY = b"kfold_ray.fold"
_MODEL_KEY = b"kfold_ray.model"


def make_prediction_batch(
    *,
    fold: int,
    image_indices: np.ndarray,
    det_image_index: np.ndarray,
    boxes: np.ndarray,
    scores: np.ndarray,
    classes: np.ndarray,
    image_ids: np.ndarray,
    category_ids: np.ndarray,
    model: str = "",
) -> pa.RecordBatch:
    """Build one prediction batch.

    Args:
        fold: the fold whose model predicted these images.
        image_indices: int (B,) every image this batch covers, detections or not.
        det_image_index: int (D,) image index of each detection.
        boxes: float (D, 4) absolute xyxy.
        scores: float (D,).
        classes: int (D,) class indices.
        image_ids: int64 (N,) the dataset's image ids (to look up COCO ids).
        category_ids: int64 (C,) COCO category id of each class index.
        model: identity of the model that made the predictions (its checkpoint's name and hash):
            a fold's predictions must all come from one model.
    """
    det_image_index = np.asarray(det_image_index, dtype=np.int64)
    classes = np.asarray(classes, dtype=np.int32)
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    columns = [
        pa.array(det_image_index),
        pa.array(image_ids[det_image_index].astype(np.int64)),
        pa.array(np.full(det_image_index.shape[0], fold, dtype=np.int32)),
        pa.array(classes),
        pa.array(category_ids[classes].astype(np.int64)),
        pa.array(boxes[:, 0]),
        pa.array(boxes[:, 1]),
        pa.array(boxes[:, 2]),
        pa.array(boxes[:, 3]),
        pa.array(np.asarray(scores, dtype=np.float32)),
    ]
    metadata = {
        _IMAGES_KEY: np.asarray(image_indices, dtype="<i8").tobytes(),
        _FOLD_KEY: str(int(fold)).encode(),
        _MODEL_KEY: model.encode(),
    }
    return pa.RecordBatch.from_arrays(columns, schema=DETECTION_SCHEMA.with_metadata(metadata))


def batch_image_indices(batch: pa.RecordBatch | pa.Table) -> np.ndarray:
    """int64 (B,): the images a batch covers (including those with no detection)."""
    return np.frombuffer(batch.schema.metadata[_IMAGES_KEY], dtype="<i8").astype(np.int64)


def batch_fold(batch: pa.RecordBatch | pa.Table) -> int:
    return int(batch.schema.metadata[_FOLD_KEY])


def batch_model(batch: pa.RecordBatch | pa.Table | pa.Schema) -> str:
    """The model that made a batch ("" when the backend did not say)."""
    schema = batch if isinstance(batch, pa.Schema) else batch.schema
    return (schema.metadata or {}).get(_MODEL_KEY, b"").decode()


def empty_detections() -> pa.Table:
    return DETECTION_SCHEMA.empty_table()
