"""Known label errors of a dataset (the example's answer key), and how well a ranking finds them."""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from .._exceptions import KfoldRayError
from ..storage._storage import Storage

if TYPE_CHECKING:
    from ..data._dataset import CocoDataset

__all__ = ["INJECTED_ERRORS", "injected_errors_of", "read_injected_errors", "score_against_injected"]


# ---- known errors (the example's answer key) -----------------------------------------------------------
#: The file a dataset with known, injected label errors keeps beside its annotations
#: (`kfold_ray.data._example` writes one): a JSON list of records with at least ``image_id`` and ``kind``.
INJECTED_ERRORS = "injected_errors.json"


def read_injected_errors(location: str | os.PathLike[str]) -> list[dict[str, Any]] | None:
    """The injected errors listed in ``location`` (the file, or the folder holding
    `INJECTED_ERRORS`; a path or a URI), or None when there is no such file or it is not a
    list of records with an ``image_id``."""
    location = str(location)
    if not location.endswith(".json"):
        location = location.rstrip("/") + "/" + INJECTED_ERRORS
    folder, slash, name = location.rpartition("/")
    try:
        storage = Storage(folder or slash or ".", what="dataset folder")
        if not storage.is_file(name):
            return None
        doc = json.loads(storage.read_text(name))
    except (OSError, ValueError, KfoldRayError):  # no answer key to show: not an error
        return None
    if not isinstance(doc, list) or not all(isinstance(e, dict) and "image_id" in e for e in doc):
        return None
    return doc


def injected_errors_of(dataset: CocoDataset) -> list[dict[str, Any]] | None:
    """The injected errors recorded beside the dataset's annotations, or None."""
    return read_injected_errors(str(dataset.annotations_path).rsplit("/", 1)[0])


def score_against_injected(table: pa.Table, injected: list[dict[str, Any]]) -> dict[str, Any]:
    """How well a ranking (worst first) finds known errors: ``n`` images with an error,
    ``in_top_n`` of them among the n worst, ``precision`` (in_top_n / n), ``auroc`` of the rank
    (None when every image or none has an error), and ``image_ids`` of the erroneous images."""
    from sklearn.metrics import roc_auc_score

    bad = {int(e["image_id"]) for e in injected}
    ids = table.column("image_id").to_pylist()
    hit = np.array([i in bad for i in ids])
    n = int(hit.sum())
    found = int(hit[:n].sum())
    rank = table.column("rank").to_numpy()
    auroc = float(roc_auc_score(hit, -rank)) if 0 < n < len(ids) else None
    return {"n": n, "in_top_n": found, "precision": found / n if n else None, "auroc": auroc,
            "image_ids": bad}


