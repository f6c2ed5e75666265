"""Out-of-fold loss inspection: the fold's model scores every GIVEN box of a held-out image.

Schubert et al. 2023 ("Identifying Label Errors in Object Detection Datasets by Loss
Inspection") rank label errors by the detector's own losses against the given labels, computed
by a model that never trained on the image. Here the box head runs on exactly the given boxes
(as proposals), on the backbone features already computed for the image's predictions, so it
costs one extra box-head pass, no sampling and no randomness:

    loss_cls      cross-entropy of the given class: high for a swapped class, or a box on nothing
    loss_box_reg  L1 of the class-specific deltas the model would apply to the box (their target
                  is zero for a well-placed box): high for a badly located box
    p_given       the model's probability of the given class
    p_background  its probability that the box holds no object (a spurious box)

Only GeneralizedRCNN models with a box head (Faster / Mask R-CNN) have these; for others the
predictions come without losses.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from .._schema import BOX_LOSS_SCHEMA
from ..data._dataset import CocoDataset


def supports_box_losses(model: Any) -> bool:
    from detectron2.modeling import GeneralizedRCNN

    heads = getattr(model, "roi_heads", None)
    return (isinstance(model, GeneralizedRCNN) and model.proposal_generator is not None
            and all(hasattr(heads, a) for a in ("box_pooler", "box_head", "box_predictor")))


def predict_with_box_losses(model, inputs: list[dict], indices: np.ndarray,
                            dataset: CocoDataset) -> tuple[list[dict], pa.Table]:
    """What ``model(inputs)`` returns in eval mode, and the box losses of the images' given boxes.

    The same steps as ``GeneralizedRCNN.inference``, keeping the backbone features for the box
    head's pass over the given boxes.
    """
    from detectron2.modeling import GeneralizedRCNN

    images = model.preprocess_image(inputs)
    features = model.backbone(images.tensor)
    proposals, _ = model.proposal_generator(images, features, None)
    results, _ = model.roi_heads(images, features, proposals, None)
    outputs = GeneralizedRCNN._postprocess(results, inputs, images.image_sizes)
    return outputs, _given_box_losses(model, features, inputs, indices, dataset)


def _given_boxes(model, inputs: list[dict], indices: np.ndarray, dataset: CocoDataset):
    """Per image: Boxes of its non-crowd given boxes at the model's input scale, classes, rows."""
    import torch
    from detectron2.structures import Boxes

    boxes, classes, rows = [], [], []
    for inp, i in zip(inputs, indices.tolist()):
        lo = int(dataset.ann_offsets[i])
        b, c, crowd = dataset.annotations_of(i)
        keep = ~crowd
        h, w = inp["image"].shape[-2:]
        scale = np.array([w / inp["width"], h / inp["height"]] * 2, dtype=np.float32)
        boxes.append(Boxes(torch.as_tensor(b[keep] * scale, device=model.device)))
        classes.append(torch.as_tensor(c[keep], device=model.device))
        rows.append(lo + np.flatnonzero(keep))
    return boxes, classes, rows


def _given_box_losses(model, features, inputs: list[dict], indices: np.ndarray,
                      dataset: CocoDataset) -> pa.Table:
    import torch

    heads = model.roi_heads
    boxes, classes, rows = _given_boxes(model, inputs, indices, dataset)
    counts = [len(b) for b in boxes]
    if not sum(counts):
        return BOX_LOSS_SCHEMA.empty_table()
    pooled = heads.box_pooler([features[f] for f in heads.box_in_features], boxes)
    scores, deltas = heads.box_predictor(heads.box_head(pooled))
    cls = torch.cat(classes)
    n = cls.shape[0]
    scores = scores.float()
    loss_cls = torch.nn.functional.cross_entropy(scores, cls, reduction="none")
    probs = scores.softmax(dim=1)
    deltas = deltas.float().view(n, -1, 4)
    own = deltas[:, 0] if deltas.shape[1] == 1 else deltas[torch.arange(n), cls]
    owner = np.repeat(indices, counts)
    return pa.table({
        "image_index": owner.astype(np.int64),
        "ann_row": np.concatenate(rows).astype(np.int64),
        "loss_cls": loss_cls.cpu().numpy().astype(np.float32),
        "loss_box_reg": own.abs().sum(dim=1).cpu().numpy().astype(np.float32),
        "p_given": probs[torch.arange(n), cls].cpu().numpy().astype(np.float32),
        "p_background": probs[:, -1].cpu().numpy().astype(np.float32),
    }, schema=BOX_LOSS_SCHEMA)
