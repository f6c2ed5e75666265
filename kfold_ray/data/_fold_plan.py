"""The fold plan: which fold holds out each image.

A `FoldPlan` gives every image of a `CocoDataset` exactly one fold: fold ``f``'s model trains on
every image whose fold is not ``f`` and predicts the images whose fold is ``f``. The plan is made
once (`make_fold_plan`), saved in the run dir, and checked against the dataset on resume, so a
resumed run never predicts an image with a model that trained on it.

Its strategies are in `kfold_ray.data._split`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .._exceptions import ConfigError, ResumeError
from ..storage._atomic import write_json
from ._dataset import CocoDataset

__all__ = ["STRATEGIES", "FoldPlan"]

STRATEGIES: tuple[str, ...] = ("kfold", "group", "stratified")
_CUSTOM_PREFIX = "custom:"
_FORMAT = "kfold-ray/fold-plan"
_VERSION = 1




# ---- the plan -------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False, repr=False)
class FoldPlan:
    """Which fold holds out each image. Arrays are stored read-only.

    Attributes:
        fold_of_image: int64 (N,) fold id (``0 .. k-1``) of each image, in dataset order.
        k: number of folds; every fold holds out at least one image.
        strategy: ``"kfold"``, ``"group"``, ``"stratified"`` or ``"custom:<ClassName>"``.
        seed: the seed the plan was made with (unused by custom splitters, recorded anyway).
        image_ids: int64 (N,) COCO image ids of the dataset the plan was made for, to refuse
            applying it to another dataset (`check_matches`).
    """

    fold_of_image: np.ndarray
    k: int
    strategy: str
    seed: int
    image_ids: np.ndarray

    def __post_init__(self) -> None:
        folds = _as_int64_vector(self.fold_of_image, "fold_of_image")
        ids = _as_int64_vector(self.image_ids, "image_ids")
        k = _plain_int(self.k, "k")
        seed = _plain_int(self.seed, "seed")
        if not isinstance(self.strategy, str) or not _is_valid_strategy(self.strategy):
            raise ConfigError(
                f"strategy={self.strategy!r} is not one of {', '.join(map(repr, STRATEGIES))} "
                f"or '{_CUSTOM_PREFIX}<ClassName>'"
            )
        problem = _plan_problem(folds, ids, k)
        if problem:
            raise ConfigError(problem)
        object.__setattr__(self, "fold_of_image", folds)
        object.__setattr__(self, "image_ids", ids)
        object.__setattr__(self, "k", k)
        object.__setattr__(self, "seed", seed)

    # ---- queries --------------------------------------------------------------------------
    @property
    def num_images(self) -> int:
        return int(self.fold_of_image.shape[0])

    def holdout_indices(self, fold: int) -> np.ndarray:
        """int64 (H,) sorted dataset indices of the images fold ``fold`` predicts."""
        return np.flatnonzero(self.fold_of_image == self._check_fold(fold)).astype(np.int64)

    def train_indices(self, fold: int) -> np.ndarray:
        """int64 (N - H,) sorted dataset indices of the images fold ``fold`` trains on."""
        return np.flatnonzero(self.fold_of_image != self._check_fold(fold)).astype(np.int64)

    def fold_sizes(self) -> np.ndarray:
        """int64 (k,) number of held-out images per fold."""
        return np.bincount(self.fold_of_image, minlength=self.k).astype(np.int64)

    def check_matches(self, dataset: CocoDataset) -> None:
        """Raise `ResumeError` unless ``dataset`` has exactly this plan's image ids, in order."""
        ids = np.asarray(dataset.image_ids, dtype=np.int64)
        if ids.shape == self.image_ids.shape and np.array_equal(ids, self.image_ids):
            return
        if ids.shape != self.image_ids.shape:
            why = f"the plan covers {self.num_images} images but the dataset has {ids.shape[0]}"
        elif np.array_equal(np.sort(ids), np.sort(self.image_ids)):
            why = "the dataset has the same image ids in a different order"
        else:
            differ = np.flatnonzero(ids != self.image_ids)
            i = int(differ[0])
            why = (
                f"{differ.size} image ids differ, the first at position {i} "
                f"(plan: {int(self.image_ids[i])}, dataset: {int(ids[i])})"
            )
        raise ResumeError(
            f"the fold plan was made for another dataset: {why}. Resume with the annotations "
            "file the run started from, or start a new run dir."
        )

    # ---- persistence ----------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict; ``folds[i]`` is the fold of the image ``image_ids[i]``."""
        return {
            "format": _FORMAT,
            "version": _VERSION,
            "k": self.k,
            "strategy": self.strategy,
            "seed": self.seed,
            "image_ids": self.image_ids.tolist(),
            "folds": self.fold_of_image.tolist(),
        }

    @classmethod
    def from_json(cls, d: Any) -> FoldPlan:
        """Rebuild a plan from `to_json`'s dict; `ResumeError` saying what is wrong otherwise."""
        if not isinstance(d, Mapping):
            raise ResumeError(f"malformed fold plan: expected a JSON object, got {describe(d)}")
        if d.get("format", _FORMAT) != _FORMAT or d.get("version", _VERSION) != _VERSION:
            raise ResumeError(
                f"unsupported fold plan: format {d.get('format')!r} version {d.get('version')!r}; "
                f"this kfold-ray reads format {_FORMAT!r} version {_VERSION}"
            )
        missing = [key for key in ("k", "strategy", "seed", "image_ids", "folds") if key not in d]
        if missing:
            raise ResumeError(f"malformed fold plan: missing key(s) {', '.join(missing)}")
        if not isinstance(d["strategy"], str):
            raise ResumeError(
                f"malformed fold plan: 'strategy' must be a string, got {describe(d['strategy'])}"
            )
        folds, image_ids = _json_int_list(d, "folds"), _json_int_list(d, "image_ids")
        if folds.shape != image_ids.shape:
            raise ResumeError(
                f"malformed fold plan: 'folds' has {folds.shape[0]} entries but 'image_ids' "
                f"has {image_ids.shape[0]}; they must align, one fold per image"
            )
        try:
            return cls(
                fold_of_image=folds,
                k=_json_int(d, "k"),
                strategy=d["strategy"],
                seed=_json_int(d, "seed"),
                image_ids=image_ids,
            )
        except ConfigError as e:
            raise ResumeError(f"malformed fold plan: {e}") from None

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the plan as JSON, atomically (a crash never leaves half a file)."""
        write_json(path, self.to_json(), indent=None)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> FoldPlan:
        """Read a plan written by `save`; `ResumeError` naming the file if it cannot be used."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ResumeError(f"{path}: no fold plan there") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ResumeError(f"{path}: cannot read the fold plan: {e}") from None
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ResumeError(f"{path}: the fold plan is not valid JSON ({e})") from None
        try:
            return cls.from_json(d)
        except ResumeError as e:
            raise ResumeError(f"{path}: {e}") from None

    # ---- dunder ---------------------------------------------------------------------------
    def __eq__(self, other: object) -> bool:
        if not isinstance(other, FoldPlan):
            return NotImplemented
        return (
            self.k == other.k
            and self.strategy == other.strategy
            and self.seed == other.seed
            and np.array_equal(self.image_ids, other.image_ids)
            and np.array_equal(self.fold_of_image, other.fold_of_image)
        )

    __hash__ = None  # type: ignore[assignment]  # holds arrays

    def __repr__(self) -> str:
        return (
            f"FoldPlan(k={self.k}, strategy={self.strategy!r}, seed={self.seed}, "
            f"num_images={self.num_images}, fold_sizes={self.fold_sizes().tolist()})"
        )

    def __reduce__(self):  # rebuild through __init__: validated, read-only arrays
        return (FoldPlan, (self.fold_of_image, self.k, self.strategy, self.seed, self.image_ids))

    def _check_fold(self, fold: int) -> int:
        if isinstance(fold, (bool, np.bool_)) or not isinstance(fold, (int, np.integer)):
            raise ConfigError(f"fold must be an int, got {fold!r}")
        if not 0 <= fold < self.k:
            raise ConfigError(f"fold={fold} is out of range: this plan has folds 0..{self.k - 1}")
        return int(fold)


# ---- helpers --------------------------------------------------------------------------------
def _is_valid_strategy(strategy: str) -> bool:
    return strategy in STRATEGIES or (
        strategy.startswith(_CUSTOM_PREFIX) and len(strategy) > len(_CUSTOM_PREFIX)
    )


def _plan_problem(folds: np.ndarray, ids: np.ndarray, k: int) -> str | None:
    if k < 2:
        return f"k={k} is out of range: a plan needs k >= 2"
    if folds.shape != ids.shape:
        return f"fold_of_image has {folds.shape[0]} entries but image_ids has {ids.shape[0]}"
    if folds.size and (folds.min() < 0 or folds.max() >= k):
        bad = int(folds[(folds < 0) | (folds >= k)][0])
        return f"fold_of_image holds fold {bad}, outside 0..{k - 1}"
    empty = np.flatnonzero(np.bincount(folds, minlength=k) == 0)
    if empty.size:
        return f"fold(s) {', '.join(map(str, empty.tolist()))} hold out no image"
    unique, counts = np.unique(ids, return_counts=True)
    if unique.size != ids.size:
        return f"image_ids repeats id(s) {preview(unique[counts > 1].tolist())}"
    return None


def _as_int64_vector(values: Any, name: str) -> np.ndarray:
    arr = np.array(values)  # a copy: the plan owns it
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
        raise ConfigError(
            f"{name} must be a 1-D integer array, got dtype {arr.dtype} shape {arr.shape}"
        )
    arr = arr.astype(np.int64)
    arr.setflags(write=False)
    return arr


def _plain_int(value: Any, name: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ConfigError(f"{name} must be an int, got {value!r}")
    return int(value)


def _json_int(d: Mapping[str, Any], key: str) -> int:
    value = d[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ResumeError(f"malformed fold plan: {key!r} must be an integer, got {describe(value)}")
    return value


def _json_int_list(d: Mapping[str, Any], key: str) -> np.ndarray:
    value = d[key]
    if not isinstance(value, list):
        raise ResumeError(f"malformed fold plan: {key!r} must be a list, got {describe(value)}")
    bad = next(
        (i for i, v in enumerate(value) if isinstance(v, bool) or not isinstance(v, int)), None
    )
    if bad is not None:
        raise ResumeError(
            f"malformed fold plan: {key!r}[{bad}] must be an integer, got {describe(value[bad])}"
        )
    try:
        return np.array(value, dtype=np.int64)
    except OverflowError:
        raise ResumeError(f"malformed fold plan: {key!r} holds an integer beyond int64") from None


def describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"[:80]


def preview(ids: Sequence[Any], limit: int = 5) -> str:
    shown = ", ".join(str(i) for i in ids[:limit])
    return f"{shown} and {len(ids) - limit} more" if len(ids) > limit else shown
