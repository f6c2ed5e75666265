"""Every zoo detector family gets its per-box signals (box_losses.parquet), and the report ranks
its boxes (box_issues.parquet): Faster, Mask and Cascade R-CNN (the box head on the given boxes;
Cascade: every stage, probabilities averaged as its inference does), the C4 models (Res5 head),
RetinaNet (the given boxes against the anchors that match them). An architecture without any is
named in one warning before anything is reserved.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from cocofactory import make_coco

from kfold_ray._cli import main
from kfold_ray._config import TrainConfig
from kfold_ray._schema import BOX_LOSS_SCHEMA
from kfold_ray.data._dataset import load_coco
from kfold_ray.detectron2 import Detectron2Backend
from kfold_ray.detectron2._config import import_detectron2

FROM_SCRATCH = ("MODEL.WEIGHTS", "", "MODEL.BACKBONE.FREEZE_AT", "0", "MODEL.RESNETS.DEPTH", "18",
                "MODEL.RESNETS.RES2_OUT_CHANNELS", "64", "MODEL.RESNETS.NORM", "BN",
                "INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MAX_SIZE_TRAIN", "128",
                "INPUT.MIN_SIZE_TEST", "96", "INPUT.MAX_SIZE_TEST", "128")
FAMILIES = {
    "faster": ("tiny", ()),
    "mask": ("tiny", ("MODEL.MASK_ON", "True", "MODEL.ROI_MASK_HEAD.CONV_DIM", "64")),
    "cascade": ("tiny", ("MODEL.ROI_HEADS.NAME", "CascadeROIHeads",
                         "MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG", "True")),
    "retinanet": ("COCO-Detection/retinanet_R_50_FPN_1x.yaml",
                  (*FROM_SCRATCH, "MODEL.FPN.OUT_CHANNELS", "64", "SOLVER.BASE_LR", "0.005")),
    "c4": ("COCO-Detection/faster_rcnn_R_50_C4_1x.yaml", (*FROM_SCRATCH, "SOLVER.BASE_LR", "0.005")),
}
FAMILY_OF = {"faster": "roi", "mask": "roi", "cascade": "cascade", "retinanet": "retinanet", "c4": "res5"}
SHORT = ("SOLVER.MAX_ITER", "3", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "1",
         "SOLVER.STEPS", "(2,)")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    ann, images = make_coco(tmp_path_factory.mktemp("families"), n_images=8, categories=3,
                            segmentation="polygon")
    return ann, images, load_coco(ann, images)


def _model(name: str, dataset):
    import_detectron2()
    from detectron2.modeling import build_model

    model, overrides = FAMILIES[name]
    cfg = Detectron2Backend().build_cfg(TrainConfig(model=model, overrides=overrides),
                                        num_classes=dataset.num_classes, device="cpu")
    m = build_model(cfg)
    m.eval()
    return cfg, m


def _inputs(cfg, dataset):
    from kfold_ray.detectron2._predict import _InputLoader

    loader = _InputLoader(cfg)
    return [loader(dataset, i) for i in range(dataset.num_images)]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_signals_come_with_the_models_own_predictions(dataset, name):
    import torch

    from kfold_ray.detectron2._losses import box_signal_family, predict_with_box_losses

    _, _, ds = dataset
    cfg, model = _model(name, ds)
    assert box_signal_family(model) == FAMILY_OF[name]
    inputs = _inputs(cfg, ds)
    index = np.arange(ds.num_images)
    with torch.inference_mode():
        outputs, losses = predict_with_box_losses(model, inputs, index, ds)
        reference = model(inputs)
    for ours, theirs in zip(outputs, reference):  # the predictions are the model's own
        assert torch.equal(ours["instances"].pred_boxes.tensor, theirs["instances"].pred_boxes.tensor)
        assert torch.equal(ours["instances"].scores, theirs["instances"].scores)
    assert losses.schema.equals(BOX_LOSS_SCHEMA)
    assert losses.column("ann_row").to_pylist() == np.flatnonzero(~ds.iscrowd).tolist()
    t = losses.to_pandas()
    assert not t.isna().any().any()
    for column in ("p_given", "p_other", "p_background", "refined_iou"):
        assert t[column].between(0, 1).all(), column
    assert (t.loss_cls >= 0).all() and (t.loss_box_reg >= 0).all()
    assert (t.other_class != ds.classes[t.ann_row]).all() and t.other_class.between(0, 2).all()


def test_cascade_averages_its_stages_on_the_given_boxes(dataset):
    """p_given is the mean over Cascade's stages of each stage's probability of the given class,
    as Detectron2's own stages compute it on the given boxes as proposals."""
    import torch
    from detectron2.structures import Instances

    from kfold_ray.detectron2._losses import _given_boxes, predict_with_box_losses

    _, _, ds = dataset
    cfg, model = _model("cascade", ds)
    inputs = _inputs(cfg, ds)[:2]
    index = np.arange(2)
    with torch.inference_mode():
        _, losses = predict_with_box_losses(model, inputs, index, ds)
        images = model.preprocess_image(inputs)
        features = model.backbone(images.tensor)
        boxes, classes, _ = _given_boxes(model, inputs, index, ds)
        proposals = []
        for b, size in zip(boxes, images.image_sizes):
            inst = Instances(size)
            inst.proposal_boxes = b
            proposals.append(inst)
        heads = model.roi_heads
        feats = [features[f] for f in heads.box_in_features]
        probs = sum(torch.cat(heads.box_predictor[k].predict_probs(heads._run_stage(feats, proposals, k), proposals))
                    for k in range(heads.num_cascade_stages)) / heads.num_cascade_stages
    cls = torch.cat(classes)
    expected = probs[torch.arange(cls.numel()), cls].numpy()
    np.testing.assert_allclose(losses.column("p_given").to_numpy(), expected, rtol=1e-5, atol=1e-6)


def test_retinanet_scores_each_box_on_the_anchors_its_matcher_gives_it(dataset):
    """One given box per image: its anchors are the ones RetinaNet's own matcher labels with its
    class, and loss_box_reg is Detectron2's dense box loss (L1) over them, per anchor."""
    import torch
    from detectron2.modeling.box_regression import _dense_box_regression_loss
    from detectron2.structures import Boxes, Instances

    from kfold_ray.detectron2._losses import _given_boxes, _retinanet_image

    _, _, ds = dataset
    cfg, model = _model("retinanet", ds)
    inputs = _inputs(cfg, ds)
    with torch.inference_mode():
        images = model.preprocess_image(inputs)
        features = [model.backbone(images.tensor)[f] for f in model.head_in_features]
        logits, deltas = model._transpose_dense_predictions(model.head(features), [model.num_classes, 4])
        anchors = model.anchor_generator(features)
        boxes, classes, _ = _given_boxes(model, inputs, np.arange(ds.num_images), ds)
        checked = 0
        for i in range(ds.num_images):
            if len(boxes[i]) != 1:
                continue
            gt = Instances(images.image_sizes[i])
            gt.gt_boxes, gt.gt_classes = boxes[i], classes[i]
            labels, matched = model.label_anchors(anchors, [gt])
            positive = labels[0] == classes[i][0]
            ours = _retinanet_image(model, Boxes.cat(anchors), torch.cat([x[i] for x in logits]),
                                    torch.cat([x[i] for x in deltas]), boxes[i], classes[i])
            expected = _dense_box_regression_loss(
                anchors, model.box2box_transform, [x[i:i + 1] for x in deltas], [matched[0]],
                positive[None], box_reg_loss_type="smooth_l1", smooth_l1_beta=0.0) / positive.sum()
            np.testing.assert_allclose(ours["loss_box_reg"].numpy(), [expected.item()], rtol=1e-4)
            assert ours["probs"].shape == (1, model.num_classes)
            checked += 1
    assert checked >= 2


@pytest.mark.slow
@pytest.mark.parametrize("name", ["faster", "mask", "cascade", "retinanet"])
def test_each_family_end_to_end_through_kfold_ray_report(dataset, tmp_path, name, capsys):
    ann, images, ds = dataset
    model, overrides = FAMILIES[name]
    run_dir = tmp_path / "run"
    assert main(["run", "--annotations", str(ann), "--images", str(images), "-k", "2",
                 "--model", model, "--run-dir", str(run_dir), "--gpus-per-fold", "0",
                 "--address", "local", "--quiet", "--opts", *overrides, *SHORT]) == 0
    losses = pq.read_table(run_dir / "box_losses.parquet").to_pandas()
    assert len(losses) == int((~ds.iscrowd).sum())
    assert losses[["p_other", "refined_iou", "p_given", "p_background"]].notna().all().all()
    capsys.readouterr()
    assert main(["report", str(run_dir), "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "box_issues.parquet" in out
    boxes = pq.read_table(run_dir / "box_issues.parquet").to_pandas()
    given = boxes[boxes.source == "given"]
    assert sorted(given.annotation_id) == sorted(ds.ann_ids[~ds.iscrowd].tolist())
    assert given.p_other.notna().all() and set(boxes.kind) <= {"swapped", "badly_located",
                                                                 "spurious", "overlooked"}
    assert boxes["rank"].tolist() == list(range(1, len(boxes) + 1))
    issues = pq.read_table(run_dir / "label_issues.parquet").to_pandas()
    records = [r for b in issues.boxes for r in json.loads(b)]
    assert any(r["source"] == "given" and "p_other" in r for r in records)
    page = (run_dir / "report" / "index.html").read_text()
    assert "box_issues.parquet" in page


def test_an_architecture_without_signals_is_named_once_before_anything_is_reserved(dataset, tmp_path,
                                                                                    caplog, capsys):
    ann, images, _ = dataset
    # RPN only: no box head, no per-box signals. The missing weights file stops the run right
    # after the config checks, before the run dir is made or Ray is started.
    with caplog.at_level("WARNING", logger="kfold_ray"):
        code = main(["run", "--annotations", str(ann), "--images", str(images), "-k", "2",
                     "--model", "COCO-Detection/rpn_R_50_FPN_1x.yaml", "--run-dir",
                     str(tmp_path / "run"), "--gpus-per-fold", "0", "--address", "local",
                     "--opts", "MODEL.WEIGHTS", str(tmp_path / "missing.pkl")])
    assert code == 2 and not (tmp_path / "run").exists()
    assert "MODEL.WEIGHTS" in capsys.readouterr().err
    warnings = [r.getMessage() for r in caplog.records if "has no per-box signals" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith("ProposalNetwork has no per-box signals")
