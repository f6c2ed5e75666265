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


# ---- per given box: the fold model's losses (out-of-fold loss inspection) ---------------------
#: One row per given (non-crowd) box of a predicted image, computed by the fold's model on the
#: same features as its predictions. They travel inside the prediction batch (schema metadata),
#: so they persist, retry and stitch exactly as the batch's images do.
BOX_LOSS_SCHEMA = pa.schema(
    [
        ("image_index", pa.int64()),
        ("ann_row", pa.int64()),  # the annotation's row in the dataset's annotation arrays
        ("loss_cls", pa.float32()),  # cross-entropy of the given class on exactly the given box
        ("loss_box_reg", pa.float32()),  # L1 of the deltas the model would apply to the box
        ("p_given", pa.float32()),  # the model's probability of the given class for that box
        ("p_background", pa.float32()),  # its probability that the box holds no object at all
        # Added in 0.2 (issue 18); parts and box_losses.parquet of older runs lack them:
        ("p_other", pa.float32()),  # its best probability of a class other than the given one
        ("other_class", pa.int32()),  # that class (class index)
        ("refined_iou", pa.float32()),  # IoU of the box with where the model would move it
    ]
)
#: The columns every BOX_LOSS_SCHEMA table has (older runs' parts carry only these).
BOX_LOSS_BASE_COLUMNS = ("image_index", "ann_row", "loss_cls", "loss_box_reg", "p_given",
                         "p_background")
_LOSSES_KEY = b"kfold_ray.box_losses"


def with_box_losses(batch: pa.RecordBatch, losses: pa.Table) -> pa.RecordBatch:
    """``batch`` carrying ``losses`` (BOX_LOSS_SCHEMA) in its schema metadata."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, BOX_LOSS_SCHEMA) as writer:
        writer.write_table(conform_box_losses(losses))
    metadata = {**(batch.schema.metadata or {}), _LOSSES_KEY: sink.getvalue().to_pybytes()}
    return batch.replace_schema_metadata(metadata)


def conform_box_losses(losses: pa.Table) -> pa.Table:
    """``losses`` with BOX_LOSS_SCHEMA's columns in its order: a column added after the table
    was written (a part of an older run) is null."""
    columns = [losses.column(f.name).cast(f.type) if f.name in losses.column_names
               else pa.nulls(losses.num_rows, f.type) for f in BOX_LOSS_SCHEMA]
    return pa.Table.from_arrays(columns, schema=BOX_LOSS_SCHEMA)


def batch_box_losses(batch: pa.RecordBatch | pa.Table | pa.Schema) -> pa.Table | None:
    """The box losses a batch carries, or None when its backend computed none."""
    schema = batch if isinstance(batch, pa.Schema) else batch.schema
    data = (schema.metadata or {}).get(_LOSSES_KEY)
    if data is None:
        return None
    return conform_box_losses(pa.ipc.open_stream(pa.py_buffer(data)).read_all())
