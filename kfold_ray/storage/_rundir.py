"""The run dir's layout, in the run's storage (a local folder or a URI).

Every file a later step, a retry on another node or a resume needs lives here; this module is the
one place that names them::

    run.json                  state: run name, fingerprint, status (running / finished)
    config.json               what the run was made from (dataset location, CVConfig, versions)
    model_config.yaml         the merged model config every fold trains with (Detectron2's dump)
    excluded_images.json      images left out as unreadable (--exclude-unreadable), with the reason
    folds.json                the fold plan (read back on --resume, never recomputed)
    weights/                  MODEL.WEIGHTS, fetched once by the driver, read by every fold
    folds/fold_000/           a fold's checkpoints (newest kept), last_checkpoint, log.txt, and
                              ran_with.json: the device, AMP and GPUs it really trained with
    parts/fold_000/           streamed prediction batches (Arrow IPC) and DONE.json
    predictions.parquet  cleanlab_predictions.pkl  cleanlab_labels.pkl  coco_results.json
    categories.json  metrics.json  label_issues.parquet/.csv  report/index.html
    box_losses.parquet        per given box, the out-of-fold model's losses (loss inspection)
    box_issues.parquet        the per-box ranking (given boxes and unmatched predictions)
    in_sample/                the same layout, for the in-sample baseline

Nothing is relative to a process' working directory: a local run dir is made absolute on the
driver, and on a cluster it must be a URI or a mount every node shares.
"""

from __future__ import annotations

import hashlib
import os
import re
from datetime import datetime

from ._storage import Storage

RUN_STATE = "run.json"
CONFIG = "config.json"
FOLD_PLAN = "folds.json"
METRICS = "metrics.json"
MODEL_CONFIG = "model_config.yaml"
EXCLUDED_IMAGES = "excluded_images.json"
WEIGHTS = "weights"
PARTS = "parts"
FOLD_WORK = "folds"
IN_SAMPLE = "in_sample"
REPORT = "report"
DONE = "DONE.json"
LAST_CHECKPOINT = "last_checkpoint"  # Detectron2's pointer to a fold's newest checkpoint
RAN_WITH = "ran_with.json"  # in a fold's work folder: what it really trained with
PREDICTIONS_PARQUET = "predictions.parquet"
CLEANLAB_PREDICTIONS = "cleanlab_predictions.pkl"
CLEANLAB_LABELS = "cleanlab_labels.pkl"
COCO_RESULTS = "coco_results.json"
CATEGORIES = "categories.json"
BOX_LOSSES_PARQUET = "box_losses.parquet"
LABEL_ISSUES_PARQUET = "label_issues.parquet"
LABEL_ISSUES_CSV = "label_issues.csv"
BOX_ISSUES_PARQUET = "box_issues.parquet"
OUTPUT_FILES = (PREDICTIONS_PARQUET, CLEANLAB_PREDICTIONS, CLEANLAB_LABELS, COCO_RESULTS,
                CATEGORIES, METRICS, FOLD_PLAN)


def fold_parts(fold: int) -> str:
    """Folder of a fold's streamed prediction parts."""
    return f"{PARTS}/fold_{int(fold):03d}"


def fold_work(fold: int) -> str:
    """Folder of a fold's checkpoints and Detectron2 log."""
    return f"{FOLD_WORK}/fold_{int(fold):03d}"


def default_location(annotations: str) -> str:
    """``runs/<annotations stem>-<time>`` under the current folder (absolute)."""
    stem = re.sub(r"\.json$", "", str(annotations).rstrip("/").rsplit("/", 1)[-1])
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return os.path.abspath(os.path.join("runs", f"{stem}-{stamp}"))


def run_name(storage: Storage) -> str:
    """Ray actor names and Detectron2 dataset names of this run: unique, simple characters."""
    digest = hashlib.sha1(storage.uri.encode()).hexdigest()[:8]
    return f"{re.sub(r'[^A-Za-z0-9_-]+', '-', storage.name)[:40]}-{digest}"
