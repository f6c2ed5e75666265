"""Detectron2 configs: the model-zoo base, kfold-ray's presets, the user's overrides, and the keys
kfold-ray owns (the fold's data, device, seed, checkpoints). Also where Detectron2 is imported, with
the compat layer in place and the warnings that are not ours kept off the user's console.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from .._config import TrainConfig
from .._exceptions import ConfigError, one_line

# Presets: a model-zoo base config plus overrides. `tiny` trains from scratch (no weights can be
# downloaded on every machine) and is small enough for CPU: ResNet-18 FPN on ~128 px images.
# From scratch needs a trainable backbone with a trainable norm, warmup and a modest LR, else the
# loss goes NaN (DESIGN.md).
PRESETS: dict[str, tuple[str, tuple[str, ...]]] = {
    "tiny": (
        "COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml",
        (
            "MODEL.WEIGHTS", "",
            "MODEL.BACKBONE.FREEZE_AT", "0",
            "MODEL.RESNETS.DEPTH", "18",
            "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
            "MODEL.RESNETS.NORM", "BN",
            "MODEL.FPN.OUT_CHANNELS", "128",
            "MODEL.ANCHOR_GENERATOR.SIZES", "[[16], [32], [64], [128], [256]]",
            "MODEL.RPN.PRE_NMS_TOPK_TRAIN", "600",
            "MODEL.RPN.POST_NMS_TOPK_TRAIN", "300",
            "MODEL.RPN.PRE_NMS_TOPK_TEST", "300",
            "MODEL.RPN.POST_NMS_TOPK_TEST", "100",
            "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "128",
            "MODEL.ROI_BOX_HEAD.FC_DIM", "256",
            "INPUT.MIN_SIZE_TRAIN", "(128,)",
            "INPUT.MAX_SIZE_TRAIN", "192",
            "INPUT.MIN_SIZE_TEST", "128",
            "INPUT.MAX_SIZE_TEST", "192",
            "INPUT.RANDOM_FLIP", "none",
            "SOLVER.IMS_PER_BATCH", "8",
            # Measured on the digits example: LR 0.02 diverges even with clipping; 0.01 with
            # clipping and batch 8 finds 107 of 120 held-out digits (score > 0.5) in 150 iters.
            "SOLVER.BASE_LR", "0.01",
            "SOLVER.CLIP_GRADIENTS.ENABLED", "True",
            "SOLVER.WARMUP_ITERS", "50",
            "SOLVER.MAX_ITER", "300",
            "SOLVER.STEPS", "(240,)",
        ),
    ),
}


def import_detectron2():
    """Import detectron2 with the compat layer in place (a no-op on official builds)."""
    from ._compat import install_import_hook

    install_import_hook()
    import detectron2  # noqa: F401

    with warnings.catch_warnings():
        # detectron2 0.6's model zoo imports pkg_resources and its layers call torch.jit.script:
        # both warn on every start, about code that is not ours, on the user's console.
        warnings.filterwarnings("ignore", message=r".*pkg_resources is deprecated.*")
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*is deprecated.*")
        import detectron2.model_zoo  # noqa: F401
        import detectron2.modeling  # noqa: F401

    from . import _files

    _files.register()  # images and weights may be s3:// (or other pyarrow) URIs
    return detectron2


def build_cfg(train: TrainConfig, *, num_classes: int, device: str, output_dir: str = "",
              dataset_name: str = "", seed: int = 0, checkpoint_period: int | None = None,
              score_threshold: float = 0.05, num_workers: int | None = None,
              weights: str | None = None, mask_format: str | None = None):
    """Detectron2 ``CfgNode``: base config + preset + user overrides + what kfold-ray owns."""
    import_detectron2()
    from detectron2 import model_zoo
    from detectron2.config import get_cfg

    cfg = get_cfg()
    base, preset_overrides = resolve_model(train.model)
    try:
        if base.endswith(".yaml") and Path(base).is_file():
            cfg.merge_from_file(base)
        else:
            cfg.merge_from_file(model_zoo.get_config_file(base))
        cfg.merge_from_list(list(preset_overrides))
        cfg.merge_from_list(list(train.overrides))
    except (KeyError, ValueError, AssertionError, RuntimeError, TypeError) as e:
        raise ConfigError(f"Detectron2 config for model {train.model!r}: {one_line(e)}") from e
    _own_keys(cfg, train, num_classes=num_classes, device=device, output_dir=output_dir,
                   dataset_name=dataset_name, seed=seed, checkpoint_period=checkpoint_period,
                   score_threshold=score_threshold, num_workers=num_workers)
    if weights is not None:
        cfg.MODEL.WEIGHTS = weights
    if cfg.MODEL.MASK_ON and mask_format == "bitmask":
        cfg.INPUT.MASK_FORMAT = "bitmask"  # RLE masks: Detectron2's polygon format refuses them
    return cfg


def _own_keys(cfg, train: TrainConfig, *, num_classes, device, output_dir, dataset_name, seed,
              checkpoint_period, score_threshold, num_workers) -> None:
    """Keys kfold-ray decides whatever the user's config says (the fold's data, its device)."""
    cfg.DATASETS.TRAIN = (dataset_name,) if dataset_name else ()
    cfg.DATASETS.TEST = ()
    cfg.TEST.EVAL_PERIOD = 0
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = num_classes
    cfg.MODEL.RETINANET.NUM_CLASSES = num_classes
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = score_threshold
    cfg.MODEL.RETINANET.SCORE_THRESH_TEST = score_threshold
    cfg.MODEL.DEVICE = device
    cfg.SOLVER.AMP.ENABLED = bool(train.amp and device.startswith("cuda"))
    if checkpoint_period is not None:
        cfg.SOLVER.CHECKPOINT_PERIOD = checkpoint_period
    cfg.OUTPUT_DIR = output_dir
    cfg.SEED = seed
    if num_workers is not None and not sets_key(train, "DATALOADER.NUM_WORKERS"):
        # The fold's reserved CPUs feed the GPU; the user's own value wins.
        cfg.DATALOADER.NUM_WORKERS = num_workers


def sets_key(train: TrainConfig, key: str) -> bool:
    """Whether the user's overrides (or the model's preset) set ``key``."""
    _, preset = resolve_model(train.model)
    pairs = list(preset) + list(train.overrides)
    return key in pairs[0::2]


def resolve_model(model: str) -> tuple[str, tuple[str, ...]]:
    if model in PRESETS:
        return PRESETS[model]
    return model, ()
