"""The product's backend: Detectron2 trains a fold and predicts its held-out images in batches.

Everything Detectron2 (``CfgNode``, ``Instances``, catalogs) stays inside this module: what leaves
it is `Progress` and Arrow prediction batches built on the CPU, as Detectron2's own evaluators do.
Detectron2, torch and the compat layer are imported lazily, so ``import kfold_ray`` stays fast.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import os
import queue
import shutil
import socket
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from ._backend import DiscardParts, FoldEvent, FoldTask, Progress
from ._config import TrainConfig
from ._dataset import CocoDataset
from ._checkpoints import CheckpointSync
from ._exceptions import ConfigError, DatasetError, FoldOutOfMemoryError, ImageReadError
from ._schema import batch_image_indices, make_prediction_batch
from ._storage import Storage, is_uri

log = logging.getLogger(__name__)

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


def _import_detectron2():
    """Import detectron2 with the compat layer in place (a no-op on official builds)."""
    from ._d2compat import install_import_hook

    install_import_hook()
    import detectron2  # noqa: F401

    with warnings.catch_warnings():
        # detectron2 0.6's model zoo imports pkg_resources and its layers call torch.jit.script:
        # both warn on every start, about code that is not ours, on the user's console.
        warnings.filterwarnings("ignore", message=r".*pkg_resources is deprecated.*")
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*is deprecated.*")
        import detectron2.model_zoo  # noqa: F401
        import detectron2.modeling  # noqa: F401

    from . import _d2files

    _d2files.register()  # images and weights may be s3:// (or other pyarrow) URIs
    return detectron2


class Detectron2Backend:
    """Detectron2 fold backend. Stateless: safe to pickle into every fold actor."""

    # ---- configuration ----------------------------------------------------------------------
    def validate(self, train: TrainConfig, dataset: CocoDataset) -> None:
        cfg = self.build_cfg(train, num_classes=dataset.num_classes, device="cpu")
        if cfg.MODEL.MASK_ON:
            problem = dataset.segmentation_problem()
            if problem:
                raise DatasetError(problem, path=str(dataset.annotations_path))

    def describe(self, train: TrainConfig, dataset: CocoDataset) -> str:
        """The merged config every fold trains with, as YAML (Detectron2's ``cfg.dump()``).

        Part of the run's fingerprint (a resume never mixes two models) and of the run dir.
        Fold-specific keys (dataset name, output dir, seed, device) are left at neutral values.
        """
        return self.build_cfg(train, num_classes=dataset.num_classes, device="cpu").dump()

    def fetch_weights(self, train: TrainConfig) -> Path | None:
        """The config's ``MODEL.WEIGHTS`` as a local file on the driver (None: from scratch).

        Fetched once here, then placed in the run's storage by the driver, so that folds never
        reach for a URL. ConfigError naming MODEL.WEIGHTS, within seconds, when it cannot be had.
        """
        cfg = self.build_cfg(train, num_classes=1, device="cpu")
        spec = str(cfg.MODEL.WEIGHTS or "").strip()
        if not spec:
            return None
        try:
            return _fetch(spec)
        except Exception as e:  # noqa: BLE001 - any failure to fetch is the same advice
            raise ConfigError(
                f"MODEL.WEIGHTS {spec!r} cannot be fetched ({type(e).__name__}: {_one_line(e)[:200]}): "
                "pass a local file or a URI every node can read (--opts MODEL.WEIGHTS /path/model.pkl), "
                "or train from scratch with --opts MODEL.WEIGHTS \"\""
            ) from None

    def build_cfg(self, train: TrainConfig, *, num_classes: int, device: str, output_dir: str = "",
                  dataset_name: str = "", seed: int = 0, checkpoint_period: int | None = None,
                  score_threshold: float = 0.05, num_workers: int | None = None,
                  weights: str | None = None, mask_format: str | None = None):
        """Detectron2 ``CfgNode``: base config + preset + user overrides + what kfold-ray owns."""
        _import_detectron2()
        from detectron2 import model_zoo
        from detectron2.config import get_cfg

        cfg = get_cfg()
        base, preset_overrides = _resolve_model(train.model)
        try:
            if base.endswith(".yaml") and Path(base).is_file():
                cfg.merge_from_file(base)
            else:
                cfg.merge_from_file(model_zoo.get_config_file(base))
            cfg.merge_from_list(list(preset_overrides))
            cfg.merge_from_list(list(train.overrides))
        except (KeyError, ValueError, AssertionError, RuntimeError, TypeError) as e:
            raise ConfigError(f"Detectron2 config for model {train.model!r}: {_one_line(e)}") from e
        self._own_keys(cfg, train, num_classes=num_classes, device=device, output_dir=output_dir,
                       dataset_name=dataset_name, seed=seed, checkpoint_period=checkpoint_period,
                       score_threshold=score_threshold, num_workers=num_workers)
        if weights is not None:
            cfg.MODEL.WEIGHTS = weights
        if cfg.MODEL.MASK_ON and mask_format == "bitmask":
            cfg.INPUT.MASK_FORMAT = "bitmask"  # RLE masks: Detectron2's polygon format refuses them
        return cfg

    @staticmethod
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
        if num_workers is not None and not _sets(train, "DATALOADER.NUM_WORKERS"):
            # The fold's reserved CPUs feed the GPU; the user's own value wins.
            cfg.DATALOADER.NUM_WORKERS = num_workers

    # ---- one fold ---------------------------------------------------------------------------
    def run_fold(self, task: FoldTask, dataset: CocoDataset) -> Iterator[FoldEvent]:
        """Train in node-local scratch, checkpoints mirrored to the run's storage; then predict."""
        _import_detectron2()
        scratch = Path(tempfile.mkdtemp(prefix=f"kfold-ray-{task.run_name}-fold{task.fold}-"))
        sync = CheckpointSync(Storage(task.work_dir), scratch, keep=task.keep_checkpoints)
        try:
            yield from self._run_fold(task, dataset, scratch, sync)
        finally:
            sync.push_log()
            shutil.rmtree(scratch, ignore_errors=True)

    def _run_fold(self, task: FoldTask, dataset: CocoDataset, scratch: Path,
                  sync: CheckpointSync) -> Iterator[FoldEvent]:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        _check_images_readable(dataset, task)
        resumed = sync.pull()
        _log_to_file(scratch / "log.txt")
        weights = _local_weights(task.weights, scratch)
        train_name = f"{task.run_name}_fold{task.fold}_a{task.attempt}_train"
        cfg = self.build_cfg(
            task.train, num_classes=dataset.num_classes, device=device, output_dir=str(scratch),
            dataset_name=train_name, seed=task.seed, checkpoint_period=task.checkpoint_period,
            score_threshold=task.predict.score_threshold,
            num_workers=max(0, int(task.num_cpus) - 1), weights=weights,
            mask_format=dataset.mask_format,
        )
        _register_split(train_name, dataset, task.train_indices, masks=bool(cfg.MODEL.MASK_ON))
        _fold_log(task, resumed, sync)
        try:
            model = yield from _train(cfg, task.fold, sync)
        except torch.cuda.OutOfMemoryError:
            raise FoldOutOfMemoryError(
                task.fold, "training", cfg.SOLVER.IMS_PER_BATCH,
                "lower SOLVER.IMS_PER_BATCH (--opts) or the input size (INPUT.MAX_SIZE_TRAIN), or "
                "raise --gpus-per-fold so fewer folds share a GPU (fractional GPUs share memory)",
            ) from None
        except FileNotFoundError as e:
            raise _image_error(e) from None
        model_id = _model_id(scratch, sync)
        if task.predicted_with and task.predicted_with != model_id:
            # Trained again (its final checkpoint was lost): one fold, one model.
            yield DiscardParts(task.fold, model_id)
            task = dataclasses.replace(task, predict_indices=np.asarray(task.holdout_indices))
        try:
            yield from _predict_halving_on_oom(model, cfg, task, dataset, device, model_id=model_id)
        except FileNotFoundError as e:
            raise _image_error(e) from None


def _model_id(scratch: Path, sync: CheckpointSync) -> str:
    """``<checkpoint name>:<sha256 prefix>`` of the trained model (what its predictions record)."""
    import hashlib

    name = sync.latest_local()
    if not name or not (scratch / name).is_file():
        return ""
    h = hashlib.sha256()
    with open(scratch / name, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return f"{name}:{h.hexdigest()[:16]}"


def _sets(train: TrainConfig, key: str) -> bool:
    """Whether the user's overrides (or the model's preset) set ``key``."""
    _, preset = _resolve_model(train.model)
    pairs = list(preset) + list(train.overrides)
    return key in pairs[0::2]


def _fetch(spec: str) -> Path:
    """A local file for a MODEL.WEIGHTS value: a path, a URI (s3://...) or a Detectron2 URL."""
    from detectron2.utils.file_io import PathManager

    if spec.startswith("file://"):
        spec = spec[len("file://"):]
    if not is_uri(spec):
        path = Path(spec).expanduser().absolute()
        if not path.is_file():
            raise FileNotFoundError(f"no such file {path}")
        return path
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(30)  # an unreachable host must fail within seconds, not hang
    quiet = logging.getLogger("iopath")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)  # the failure is reported once, by us, as one line
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # iopath's download progress bar
            return Path(PathManager.get_local_path(spec))
    finally:
        socket.setdefaulttimeout(previous)
        quiet.setLevel(level)


def _local_weights(weights: str, scratch: Path) -> str | None:
    """The weights the driver placed in the run's storage, copied to this node (None: config's)."""
    if not weights:
        return None
    if not is_uri(weights):
        return weights
    from ._d2files import download

    return str(download(weights, scratch / "weights"))


def _node() -> str:
    try:
        import ray

        return f"{socket.gethostname()} ({ray.util.get_node_ip_address()})"
    except Exception:  # noqa: BLE001 - only for messages
        return socket.gethostname()


def _check_images_readable(dataset: CocoDataset, task: FoldTask) -> None:
    """Fail fast, with the fix, when this node cannot see the images (another disk, no mount)."""
    from detectron2.utils.file_io import PathManager

    probes = [int(i) for i in (task.train_indices[:1].tolist() + task.predict_indices[:1].tolist())]
    for i in probes:
        path = str(dataset.image_path(i))
        try:
            ok = PathManager.isfile(path)
        except Exception as e:  # noqa: BLE001 - storage errors: the same advice
            raise ImageReadError(_node(), path, f"{type(e).__name__}: {_one_line(e)[:200]}") from None
        if not ok:
            raise ImageReadError(_node(), path, "no such file on this node")


def _image_error(e: FileNotFoundError) -> ImageReadError:
    return ImageReadError(_node(), str(e.filename or e), "no such file on this node")


def _fold_log(task: FoldTask, resumed: str | None, sync: CheckpointSync) -> None:
    """One line in the fold's log saying where this attempt runs and what it resumes from."""
    where = sync.storage.uri_of(resumed) if resumed else "nothing (training from the start)"
    logging.getLogger("detectron2.kfold_ray").info(
        "kfold-ray fold %d attempt %d on node %s: resuming from %s",
        task.fold, task.attempt, _node(), where,
    )


def _resolve_model(model: str) -> tuple[str, tuple[str, ...]]:
    if model in PRESETS:
        return PRESETS[model]
    return model, ()


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _log_to_file(path: Path) -> None:
    """Send Detectron2's (and fvcore's) training log to the fold's log.txt, not to the console:
    the driver shows progress; with K folds side by side their console logs would interleave."""
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("[%(asctime)s %(name)s] %(message)s", "%m/%d %H:%M:%S"))
    for name in ("detectron2", "fvcore", "d2"):
        logger = logging.getLogger(name)
        logger.setLevel(logging.INFO)  # also keeps DefaultTrainer from adding a console logger
        logger.propagate = False
        for old in [h for h in logger.handlers if isinstance(h, logging.FileHandler)]:
            logger.removeHandler(old)
        logger.addHandler(handler)


def _register_split(name: str, dataset: CocoDataset, indices: np.ndarray, *, masks: bool = True) -> str:
    """Register a fold's training images with Detectron2 (inside the actor: see DESIGN.md).

    Every fold keeps the full category list, so class indices never shift between folds. Each
    annotation with a segmentation carries it (``masks``: True) in Detectron2's form: a list of
    polygons, or an RLE dict with compressed counts (an uncompressed RLE is compressed here,
    as Detectron2's own COCO loader does). Detectron2's mapper drops them unless
    ``MODEL.MASK_ON``; an RLE needs ``INPUT.MASK_FORMAT bitmask`` (`CocoDataset.mask_format`).
    """
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.structures import BoxMode

    with_masks = masks and dataset.segmentations is not None

    def segmentation(row: int):
        segm = dataset.segmentation(row)
        if isinstance(segm, dict) and isinstance(segm["counts"], list):
            from pycocotools import mask as mask_util

            h, w = segm["size"]
            segm = mask_util.frPyObjects(segm, h, w)
        return segm

    def dataset_dicts() -> list[dict[str, Any]]:
        dicts = []
        for i in np.asarray(indices).tolist():
            boxes, classes, crowd = dataset.annotations_of(i)
            keep = ~crowd  # crowd boxes are kept out of training
            annotations = [
                {"bbox": b.tolist(), "bbox_mode": BoxMode.XYXY_ABS, "category_id": int(c)}
                for b, c in zip(boxes[keep], classes[keep])
            ]
            if with_masks:
                rows = int(dataset.ann_offsets[i]) + np.flatnonzero(keep)
                for ann, row in zip(annotations, rows.tolist()):
                    segm = segmentation(row)
                    if segm is not None:
                        ann["segmentation"] = segm
            dicts.append({
                "file_name": str(dataset.image_path(i)),
                "image_id": int(dataset.image_ids[i]),
                "height": int(dataset.heights[i]),
                "width": int(dataset.widths[i]),
                "annotations": annotations,
            })
        return dicts

    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
    DatasetCatalog.register(name, dataset_dicts)
    MetadataCatalog.get(name).set(thing_classes=dataset.class_names)
    return name


def _train(cfg, fold: int, sync: CheckpointSync | None = None):
    """Train with Detectron2's DefaultTrainer, resuming from the fold's last checkpoint.

    The loop is TrainerBase.train written out, so that progress can be yielded between steps
    (hooks cannot yield). Returns the trained model.
    """
    from detectron2.engine import DefaultTrainer
    from detectron2.utils.env import seed_all_rng
    from detectron2.utils.events import EventStorage

    # Python, numpy and torch from the fold's seed: the model's initial weights, the training
    # sampler's order (it draws its seed from numpy) and the loader workers' augmentation.
    seed_all_rng(cfg.SEED)
    trainer = DefaultTrainer(cfg)
    trainer.resume_or_load(resume=True)  # last_checkpoint in OUTPUT_DIR, else MODEL.WEIGHTS
    start, max_iter = trainer.start_iter, trainer.max_iter
    if start:
        logging.getLogger("detectron2.kfold_ray").info(
            "kfold-ray fold %d resumes training at iteration %d of %d", fold, start, max_iter)
    report_every = max(1, min(20, max_iter // 50 or 1))
    with EventStorage(start) as trainer.storage:
        trainer.iter = start
        trainer.before_train()
        for trainer.iter in range(start, max_iter):
            trainer.before_step()
            trainer.run_step()
            trainer.after_step()
            if sync is not None:
                sync.push()  # a checkpoint written by this step goes to the run's storage
            if trainer.iter % report_every == 0 or trainer.iter == max_iter - 1:
                loss = trainer.storage.latest().get("total_loss", (None,))[0]
                yield Progress(fold, "train", trainer.iter + 1, max_iter, loss)
        trainer.iter = max_iter
        trainer.after_train()
    if sync is not None:
        sync.push()
    yield Progress(fold, "train", max_iter, max_iter, None)
    return trainer.model


def _predict_halving_on_oom(model, cfg, task: FoldTask, dataset: CocoDataset,
                            device: str, *, model_id: str = "") -> Iterator[FoldEvent]:
    """`_predict`, and on a GPU out-of-memory the rest of the fold again at half the batch size
    (down to 1, then FoldOutOfMemoryError). Batches already streamed stay persisted."""
    import torch

    remaining = np.asarray(task.predict_indices, dtype=np.int64)
    batch_size, total = task.predict.batch_size, len(remaining)
    while True:
        done: list[np.ndarray] = []
        try:
            for event in _predict(model, cfg, task, dataset, device, indices=remaining,
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


def _by_size(dataset: CocoDataset, indices: np.ndarray) -> np.ndarray:
    """Held-out images ordered by (height, width, index): a batch holds images of one size where
    it can, so padding, and hence predictions, do not depend on how the images were batched."""
    return indices[np.lexsort((indices, dataset.widths[indices], dataset.heights[indices]))]


def _predict(model, cfg, task: FoldTask, dataset: CocoDataset, device: str, *,
             indices: np.ndarray | None = None, batch_size: int | None = None,
             already: int = 0, model_id: str = "") -> Iterator[FoldEvent]:
    """Batched held-out inference: images decoded ahead in a thread, the model called on lists."""
    import torch

    model.eval()
    indices = np.asarray(task.predict_indices if indices is None else indices, dtype=np.int64)
    batch_size = batch_size or task.predict.batch_size
    ordered = _by_size(dataset, indices)
    batches = [ordered[i:i + batch_size] for i in range(0, len(ordered), batch_size)]
    use_amp = task.predict.amp and device == "cuda"
    done, total = already, already + len(indices)
    for batch_indices, inputs in _prefetch(batches, dataset, cfg):
        with torch.inference_mode(), torch.autocast("cuda", enabled=use_amp):
            outputs = model(inputs)
        yield _to_record_batch(task.fold, batch_indices, outputs, dataset, model_id)
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
