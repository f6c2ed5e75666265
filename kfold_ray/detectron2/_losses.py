"""Out-of-fold loss inspection: the fold's model scores every GIVEN box of a held-out image.

Schubert et al. 2023 ("Identifying Label Errors in Object Detection Datasets by Loss
Inspection") rank label errors by the detector's own losses against the given labels, computed
by a model that never trained on the image. Here the model's heads run on exactly the given
boxes, on the backbone features already computed for the image's predictions (one extra head
pass, no sampling, no randomness). Per given box (BOX_LOSS_SCHEMA):

    loss_cls      cross-entropy of the given class: high for a swapped class, or a box on nothing
    loss_box_reg  L1 of the deltas the model would apply to the box (their target is zero for a
                  well-placed box): high for a badly located box
    p_given       the model's probability of the given class
    p_background  its probability that the box holds no object (a spurious box)
    p_other, other_class  its best probability of another class, and that class (a swap)
    refined_iou   IoU of the box with the box the model would move it to (a shifted box)

Per detector family (`box_signal_family`):

    roi        GeneralizedRCNN with StandardROIHeads (Faster / Mask / Keypoint R-CNN, FPN or DC5):
               the box head on the given boxes as proposals
    res5       GeneralizedRCNN with Res5ROIHeads (the C4 models): the same through its res5 head
    cascade    CascadeROIHeads: every stage's box head on the given boxes, their class
               probabilities averaged as Cascade's own inference does, the last stage's deltas
    retinanet  RetinaNet (one stage, no ROI head): each given box's anchors (IoU >= the
               matcher's foreground threshold, and always its best anchor): the sigmoid focal
               loss of the given class and the L1 of the deltas to the box, averaged over them;
               probabilities averaged over them (background: 1 - the best class)

Any other architecture has none: `no_signals_warning` names it once, before anything is
reserved, and its predictions come without losses.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from .._schema import BOX_LOSS_SCHEMA
from ..data._dataset import CocoDataset

__all__ = ["box_signal_family", "no_signals_warning", "predict_with_box_losses",
           "supports_box_losses"]


def box_signal_family(model: Any) -> str | None:
    """"roi", "res5", "cascade", "retinanet", or None when the model has no per-box signals."""
    from detectron2.modeling import GeneralizedRCNN, RetinaNet
    from detectron2.modeling.roi_heads import CascadeROIHeads, Res5ROIHeads, StandardROIHeads

    if isinstance(model, RetinaNet):
        return "retinanet"
    if not isinstance(model, GeneralizedRCNN) or model.proposal_generator is None:
        return None
    heads = model.roi_heads
    if isinstance(heads, CascadeROIHeads):
        return "cascade"
    if isinstance(heads, Res5ROIHeads):
        return "res5"
    if isinstance(heads, StandardROIHeads) and getattr(heads, "box_predictor", None) is not None:
        return "roi"
    return None


def supports_box_losses(model: Any) -> bool:
    return box_signal_family(model) is not None


def no_signals_warning(cfg) -> str | None:
    """One line naming an architecture without per-box signals (from its config, so the driver
    says it before anything is reserved); None when it has them."""
    arch = cfg.MODEL.META_ARCHITECTURE
    heads = cfg.MODEL.ROI_HEADS.NAME
    if arch == "RetinaNet":
        return None
    if arch in ("GeneralizedRCNN", "PanopticFPN") and cfg.MODEL.PROPOSAL_GENERATOR.NAME != "PrecomputedProposals" \
            and heads in ("StandardROIHeads", "CascadeROIHeads", "Res5ROIHeads"):
        return None
    what = arch if arch not in ("GeneralizedRCNN", "PanopticFPN") else f"{arch} with {heads}"
    return (f"{what} has no per-box signals in kfold-ray (box_losses.parquet is not "
            "written): the report ranks its images by cleanlab's scores and its unmatched "
            "predictions only (per-box signals: Faster/Mask/Cascade R-CNN, RetinaNet)")


def predict_with_box_losses(model, inputs: list[dict], indices: np.ndarray,
                            dataset: CocoDataset) -> tuple[list[dict], pa.Table]:
    """What ``model(inputs)`` returns in eval mode, and the per-box signals of the images' given
    boxes, from the same backbone features (the same steps as the model's own inference)."""
    family = box_signal_family(model)
    if family == "retinanet":
        return _retinanet(model, inputs, indices, dataset)
    from detectron2.modeling import GeneralizedRCNN

    images = model.preprocess_image(inputs)
    features = model.backbone(images.tensor)
    proposals, _ = model.proposal_generator(images, features, None)
    results, _ = model.roi_heads(images, features, proposals, None)
    outputs = GeneralizedRCNN._postprocess(results, inputs, images.image_sizes)
    boxes, classes, rows = _given_boxes(model, inputs, indices, dataset)
    counts = [len(b) for b in boxes]
    if not sum(counts):
        return outputs, BOX_LOSS_SCHEMA.empty_table()
    probs, deltas, transform = _roi_head_on(model.roi_heads, family, features, boxes)
    return outputs, _roi_signals(probs, deltas, transform, boxes, classes, rows, indices, counts)


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


def _roi_head_on(heads, family: str, features: dict, boxes: list):
    """(class probabilities (n, C+1), box deltas (n, 4) or (n, 4C), their Box2BoxTransform) of
    the ROI head on the given boxes as proposals."""
    if family == "res5":
        pooled = heads.pooler([features[f] for f in heads.in_features], boxes)
        scores, deltas = heads.box_predictor(heads.res5(pooled).mean(dim=[2, 3]))
        return scores.float().softmax(dim=1), deltas.float(), heads.box_predictor.box2box_transform
    pooled = heads.box_pooler([features[f] for f in heads.box_in_features], boxes)
    if family == "roi":
        scores, deltas = heads.box_predictor(heads.box_head(pooled))
        return scores.float().softmax(dim=1), deltas.float(), heads.box_predictor.box2box_transform
    # Cascade: each stage scores the same given boxes; probabilities averaged over the stages
    # (as CascadeROIHeads' inference does), the boxes from the last stage.
    probs = 0
    for head, predictor in zip(heads.box_head, heads.box_predictor):
        scores, deltas = predictor(head(pooled))
        probs = probs + scores.float().softmax(dim=1)
    return probs / len(heads.box_head), deltas.float(), heads.box_predictor[-1].box2box_transform


def _roi_signals(probs, deltas, transform, boxes: list, classes: list, rows: list,
                 indices: np.ndarray, counts: list[int]) -> pa.Table:
    import torch
    from detectron2.structures import Boxes, pairwise_iou

    cls = torch.cat(classes)
    n = cls.shape[0]
    at = torch.arange(n, device=cls.device)
    eps = torch.finfo(torch.float32).tiny
    deltas = deltas.view(n, -1, 4)
    own = deltas[:, 0] if deltas.shape[1] == 1 else deltas[at, cls]
    given = Boxes.cat(boxes).tensor.float()
    moved = transform.apply_deltas(own, given)
    refined = pairwise_iou(Boxes(given), Boxes(moved)).diagonal()
    return _table(indices, counts, rows, cls, probs[:, :-1], loss_cls=-(probs[at, cls] + eps).log(),
                  loss_box_reg=own.abs().sum(dim=1), p_background=probs[:, -1], refined_iou=refined)


def _table(indices: np.ndarray, counts: list[int], rows: list, cls, classes, *, loss_cls,
           loss_box_reg, p_background, refined_iou) -> pa.Table:
    """BOX_LOSS_SCHEMA rows from per-box tensors; ``classes`` (n, C) the class probabilities."""
    import torch

    n = cls.shape[0]
    at = torch.arange(n, device=cls.device)
    others = classes.clone()
    others[at, cls] = -1.0
    if others.shape[1] > 1:
        p_other, other_class = others.max(dim=1)
    else:  # one class: there is no other
        p_other, other_class = torch.zeros_like(loss_cls), torch.zeros_like(cls)
    f32 = lambda t: t.detach().float().cpu().numpy().astype(np.float32)  # noqa: E731
    return pa.table({
        "image_index": np.repeat(indices, counts).astype(np.int64),
        "ann_row": np.concatenate(rows).astype(np.int64),
        "loss_cls": f32(loss_cls), "loss_box_reg": f32(loss_box_reg),
        "p_given": f32(classes[at, cls]), "p_background": f32(p_background),
        "p_other": f32(p_other.clamp(min=0.0)), "other_class": other_class.cpu().numpy().astype(np.int32),
        "refined_iou": f32(refined_iou),
    }, schema=BOX_LOSS_SCHEMA)


# ---- RetinaNet: the given boxes against the anchors that match them -------------------------------
def _retinanet(model, inputs: list[dict], indices: np.ndarray, dataset: CocoDataset
               ) -> tuple[list[dict], pa.Table]:
    import torch
    from detectron2.modeling.postprocessing import detector_postprocess
    from detectron2.structures import Boxes

    images = model.preprocess_image(inputs)
    features = model.backbone(images.tensor)
    features = [features[f] for f in model.head_in_features]
    predictions = model.head(features)
    logits, anchor_deltas = model._transpose_dense_predictions(predictions, [model.num_classes, 4])
    anchors = Boxes.cat(model.anchor_generator(features))
    boxes, classes, rows = _given_boxes(model, inputs, indices, dataset)
    counts = [len(b) for b in boxes]
    parts = [_retinanet_image(model, anchors, torch.cat([x[i] for x in logits]).float(),
                              torch.cat([x[i] for x in anchor_deltas]).float(), boxes[i], classes[i])
             for i in range(len(inputs)) if counts[i]]
    # RetinaNet's inference applies sigmoid_ in place: the signals above come first.
    results = model.forward_inference(images, features, predictions)
    outputs = [{"instances": detector_postprocess(r, inp.get("height", s[0]), inp.get("width", s[1]))}
               for r, inp, s in zip(results, inputs, images.image_sizes)]
    if not parts:
        return outputs, BOX_LOSS_SCHEMA.empty_table()
    cat = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    cls = torch.cat(classes)
    return outputs, _table(indices, counts, rows, cls, cat["probs"], loss_cls=cat["loss_cls"],
                           loss_box_reg=cat["loss_box_reg"], p_background=cat["p_background"],
                           refined_iou=cat["refined_iou"])


def _retinanet_image(model, anchors, logits, deltas, given, cls) -> dict[str, Any]:
    """Per given box of one image: averages over its anchors (IoU >= the matcher's foreground
    threshold, and its best anchor)."""
    import torch
    from detectron2.structures import Boxes, pairwise_iou
    from fvcore.nn import sigmoid_focal_loss

    iou = pairwise_iou(given, anchors)  # (L, R)
    fg = iou >= model.anchor_matcher.thresholds[-2]
    fg[torch.arange(len(given)), iou.argmax(dim=1)] = True
    weight = fg.float() / fg.sum(dim=1, keepdim=True)  # (L, R): each box's mean over its anchors
    box_of, anchor = fg.nonzero(as_tuple=True)
    probs = logits.sigmoid()  # (R, K)
    target = torch.zeros(len(box_of), logits.shape[1], device=logits.device)
    target[torch.arange(len(box_of)), cls[box_of]] = 1.0
    focal = sigmoid_focal_loss(logits[anchor], target, alpha=model.focal_loss_alpha,
                               gamma=model.focal_loss_gamma, reduction="none").sum(dim=1)
    wanted = model.box2box_transform.get_deltas(anchors.tensor[anchor], given.tensor[box_of])
    l1 = (deltas[anchor] - wanted).abs().sum(dim=1)
    moved = model.box2box_transform.apply_deltas(deltas[anchor], anchors.tensor[anchor])
    moved_iou = pairwise_iou(Boxes(moved), Boxes(given.tensor[box_of])).diagonal()
    per_box = lambda v: torch.zeros(len(given), device=logits.device).index_add_(  # noqa: E731
        0, box_of, v * weight[box_of, anchor])
    mean_probs = weight @ probs  # (L, K)
    return {"probs": mean_probs, "loss_cls": per_box(focal), "loss_box_reg": per_box(l1),
            "p_background": per_box(1.0 - probs[anchor].max(dim=1).values),
            "refined_iou": per_box(moved_iou)}
