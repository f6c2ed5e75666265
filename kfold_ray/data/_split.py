"""Making a fold plan: the strategies that assign every image of a dataset to one fold.

Strategies:
    ``"kfold"``       shuffled, seeded K-fold; fold sizes differ by at most one.
    ``"group"``       images sharing a group (a video, a patient, a scene) stay in one fold;
                      folds balanced by image count.
    ``"stratified"``  iterative multi-label stratification on the set of classes present in each
                      image (non-crowd boxes): each fold gets about the same share of each class.
    a scikit-learn splitter object (``GroupKFold(5)``, ``StratifiedGroupKFold(5)``, ...): its test
    folds, checked to be a partition of the images; recorded as ``"custom:<ClassName>"``.

scikit-learn and iterative-stratification are imported inside the functions that use them, so
``import kfold_ray`` stays fast.
"""

from __future__ import annotations

import heapq
import warnings
from typing import Any, Hashable, Iterable, Mapping, Sequence, Union

import numpy as np

from .._exceptions import ConfigError, DatasetError
from ._dataset import CocoDataset
from ._fold_plan import _CUSTOM_PREFIX, STRATEGIES, FoldPlan, describe, preview

__all__ = ["GroupsSpec", "make_fold_plan"]

_MAX_SEED = 2**32 - 1  # numpy RandomState (scikit-learn's random_state) takes 0 .. 2**32 - 1

GroupsSpec = Union[Mapping[int, Hashable], Sequence[Hashable], str, None]
"""``image_id -> group``, one group per image in dataset order, or the name of an image field."""


# ---- making a plan --------------------------------------------------------------------------
_SPLIT_CHOICES = (
    "choose 'kfold', 'group' or 'stratified', or pass a scikit-learn splitter object "
    "such as GroupKFold(n_splits=k)"
)


def make_fold_plan(
    dataset: CocoDataset,
    k: int,
    *,
    split: str | object = "kfold",
    groups: GroupsSpec = None,
    seed: int = 0,
) -> FoldPlan:
    """Assign every image of ``dataset`` to one of ``k`` folds.

    Args:
        dataset: the validated dataset; the plan follows its image order.
        k: number of folds, ``2 <= k <= dataset.num_images``.
        split: ``"kfold"``, ``"group"``, ``"stratified"``, or a scikit-learn splitter object
            (anything with ``split(X, y, groups)`` and ``get_n_splits``) whose test folds
            partition the images and whose ``n_splits`` equals ``k``. A splitter is called with
            ``X`` = int64 (N, 1) image indices, ``y`` = int (N, C) class-presence indicator
            (1 where the image has a non-crowd box of class c) and ``groups`` = the resolved
            groups (or None).
        groups: for ``split="group"`` (or a splitter that uses groups): a mapping
            ``image_id -> group``, a sequence of N groups in dataset order, or the name of an
            image field of the COCO json (e.g. ``"video_id"``). Groups are any hashable values;
            None counts as missing.
        seed: makes the plan reproducible (``0 <= seed < 2**32``). Not passed to splitter
            objects: seed those yourself (``random_state=``).

    Raises:
        ConfigError: a bad ``k``, ``split``, ``groups`` or ``seed``, too few groups, a splitter
            whose test folds are not a partition, or a fold left empty.
        DatasetError: ``groups`` names an image field that some image lacks.
    """
    n = dataset.num_images
    k = _check_k(k, n)
    seed = _check_seed(seed)
    if isinstance(split, str):
        if split not in STRATEGIES:
            raise ConfigError(f"split={split!r} is unknown; {_SPLIT_CHOICES}")
        folds = _builtin_folds(dataset, k, split, groups, seed)
        strategy = split
    else:
        _check_splitter(split)
        codes = None if groups is None else _resolve_groups(dataset, groups)
        folds = _splitter_folds(split, dataset, k, codes)
        strategy = _CUSTOM_PREFIX + type(split).__name__
    empty = np.flatnonzero(np.bincount(folds, minlength=k) == 0)
    if empty.size:
        raise ConfigError(
            f"split={strategy!r} left fold(s) {', '.join(map(str, empty.tolist()))} empty "
            f"({n} images, k={k}); use a smaller k"
        )
    return FoldPlan(
        fold_of_image=folds, k=k, strategy=strategy, seed=seed, image_ids=dataset.image_ids
    )


def _builtin_folds(
    dataset: CocoDataset, k: int, split: str, groups: GroupsSpec, seed: int
) -> np.ndarray:
    if split == "group":
        if groups is None:
            raise ConfigError(
                "split='group' needs groups=: a mapping image_id -> group, one group per image, "
                "or the name of an image field such as 'video_id'"
            )
        return _group_folds(_resolve_groups(dataset, groups), k, seed)
    if groups is not None:
        raise ConfigError(
            f"groups= is only used by split='group' or a scikit-learn splitter; "
            f"split={split!r} would ignore it"
        )
    if split == "kfold":
        return _kfold_folds(dataset.num_images, k, seed)
    return _stratified_folds(dataset, k, seed)


def _check_k(k: Any, n: int) -> int:
    if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)):
        raise ConfigError(f"k must be an int (the number of folds), got k={k!r}")
    if not 2 <= k <= n:
        raise ConfigError(
            f"k={k} is out of range: need 2 <= k <= {n} (the number of images in the dataset)"
        )
    return int(k)


def _check_seed(seed: Any) -> int:
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
        raise ConfigError(f"seed must be an int, got seed={seed!r}")
    if not 0 <= seed <= _MAX_SEED:
        raise ConfigError(f"seed={seed} is out of range: need 0 <= seed <= {_MAX_SEED}")
    return int(seed)


def _kfold_folds(n: int, k: int, seed: int) -> np.ndarray:
    from sklearn.model_selection import KFold

    splitter = KFold(n_splits=k, shuffle=True, random_state=seed)
    return _folds_from_tests([test for _, test in splitter.split(np.zeros((n, 1)))], n)


def _stratified_folds(dataset: CocoDataset, k: int, seed: int) -> np.ndarray:
    from iterstrat.ml_stratifiers import MultilabelStratifiedKFold

    # iterstrat wants a 'multilabel-indicator' target, which needs at least two columns: pad
    # with all-zero columns (a label nobody has does not change the assignment).
    y = _presence_matrix(dataset, min_columns=2)
    splitter = MultilabelStratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    n = dataset.num_images
    return _folds_from_tests([test for _, test in splitter.split(np.zeros((n, 1)), y)], n)


def _presence_matrix(dataset: CocoDataset, *, min_columns: int = 0) -> np.ndarray:
    """int64 (N, max(C, min_columns)): 1 where image i has a non-crowd box of class c."""
    present = dataset.classes_present()
    y = np.zeros((dataset.num_images, max(dataset.num_classes, min_columns)), dtype=np.int64)
    lengths = np.array([p.shape[0] for p in present], dtype=np.int64)
    if lengths.sum():
        rows = np.repeat(np.arange(dataset.num_images), lengths)
        y[rows, np.concatenate(present).astype(np.int64)] = 1
    return y


def _folds_from_tests(tests: Sequence[np.ndarray], n: int) -> np.ndarray:
    folds = np.full(n, -1, dtype=np.int64)
    for fold, test in enumerate(tests):
        folds[test] = fold
    return folds


# ---- groups ---------------------------------------------------------------------------------
def _group_folds(codes: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Whole groups to folds, balanced by image count.

    Largest group first, each to the currently lightest fold (greedy LPT; fold sizes then differ
    by at most the largest group's size). The seed orders groups of equal size and breaks ties
    between equally light folds.
    """
    sizes = np.bincount(codes)
    n_groups = sizes.shape[0]
    if n_groups < k:
        raise ConfigError(
            f"split='group' needs at least k groups: found {n_groups} distinct groups but k={k}; "
            f"use k <= {n_groups} or finer groups"
        )
    rng = np.random.RandomState(seed)
    order = rng.permutation(n_groups)
    order = order[np.argsort(-sizes[order], kind="stable")]
    heap = [(0, tie, fold) for fold, tie in enumerate(rng.random_sample(k).tolist())]
    heapq.heapify(heap)
    ties = rng.random_sample(n_groups).tolist()
    fold_of_group = np.empty(n_groups, dtype=np.int64)
    for g, tie in zip(order.tolist(), ties):
        load, _, fold = heapq.heappop(heap)
        fold_of_group[g] = fold
        heapq.heappush(heap, (load + int(sizes[g]), tie, fold))
    return fold_of_group[codes]


def _resolve_groups(dataset: CocoDataset, groups: GroupsSpec) -> np.ndarray:
    """int64 (N,) group code of each image (codes in first-seen order)."""
    labels = (
        _groups_from_field(dataset, groups)
        if isinstance(groups, str)
        else _groups_from_user(dataset, groups)
    )
    code_of: dict[Hashable, int] = {}
    return np.array([code_of.setdefault(g, len(code_of)) for g in labels], dtype=np.int64)


def _groups_from_field(dataset: CocoDataset, field_name: str) -> list[Hashable]:
    extras = dataset.image_extras
    labels: list[Hashable] = []
    for i, image_id in enumerate(dataset.image_ids.tolist()):
        value = extras[i].get(field_name) if i < len(extras) else None
        problem = _group_value_problem(value)
        if problem:
            missing = "has no" if value is None else "has a bad"
            raise DatasetError(
                f"image {image_id} {missing} '{field_name}' field ({problem}); groups="
                f"{field_name!r} needs it on every image",
                path=str(dataset.annotations_path),
            )
        labels.append(value)
    return labels


def _groups_from_user(dataset: CocoDataset, groups: Any) -> list[Any]:
    """Groups from a mapping ``image_id -> group`` or a sequence in dataset order."""
    ids = dataset.image_ids.tolist()
    hint = ""
    if isinstance(groups, Mapping):
        labels = [groups.get(image_id) for image_id in ids]
        if any(isinstance(key, str) for key in groups):
            hint = " (its keys are strings; they must be the int COCO image ids)"
    elif isinstance(groups, Iterable) and not isinstance(groups, (bytes, bytearray)):
        labels = list(groups)
        if len(labels) != len(ids):
            raise ConfigError(
                f"groups has {len(labels)} entries but the dataset has {len(ids)} images; give "
                "one group per image in dataset order, or a mapping image_id -> group"
            )
    else:
        raise ConfigError(
            "groups must be a mapping image_id -> group, a sequence with one group per image, "
            f"or the name of an image field; got {describe(groups)}"
        )
    bad = [image_id for image_id, g in zip(ids, labels) if _group_value_problem(g)]
    if bad:
        raise ConfigError(
            f"groups has no usable group for {len(bad)} image id(s): {preview(bad)}{hint}; "
            "every image needs one (a hashable value other than None or NaN)"
        )
    return labels


def _group_value_problem(value: Any) -> str | None:
    if value is None:
        return "missing or null"
    try:
        hash(value)
    except TypeError:
        return f"a {type(value).__name__} is not a usable group; use a number or a string"
    try:
        is_nan = bool(value != value)  # NaN is never equal to itself: it cannot group anything
    except Exception:  # e.g. pandas.NA, whose comparisons are NA
        return "missing (NA)"
    return "NaN" if is_nan else None


# ---- scikit-learn splitter objects ----------------------------------------------------------
def _check_splitter(split: object) -> None:
    if isinstance(split, type):
        raise ConfigError(
            f"split={split.__name__} is a class; pass an instance, e.g. "
            f"{split.__name__}(n_splits=k)"
        )
    methods = (getattr(split, "split", None), getattr(split, "get_n_splits", None))
    if not all(callable(m) for m in methods):
        raise ConfigError(f"split={split!r} is not a valid choice; {_SPLIT_CHOICES}")


def _splitter_folds(
    splitter: Any, dataset: CocoDataset, k: int, groups: np.ndarray | None
) -> np.ndarray:
    name = type(splitter).__name__
    n = dataset.num_images
    X = np.arange(n, dtype=np.int64).reshape(-1, 1)
    y = _presence_matrix(dataset)
    try:
        n_splits = int(splitter.get_n_splits(X, y, groups))
        pairs = [(np.asarray(tr), np.asarray(te)) for tr, te in splitter.split(X, y, groups)]
    except Exception as e:
        raise ConfigError(
            f"splitter {name} failed ({type(e).__name__}: {e}); kfold-ray calls it with X = "
            "image indices (N, 1), y = class-presence indicator (N, C) and groups = the "
            "resolved groups or None"
        ) from e
    if n_splits != k or len(pairs) != k:
        raise ConfigError(
            f"k={k} but splitter {name} makes {n_splits} splits ({len(pairs)} yielded); "
            f"pass k={n_splits} or build the splitter with n_splits={k}"
        )
    tests = [_index_array(te, n, name, fold) for fold, (_, te) in enumerate(pairs)]
    _check_partition(tests, dataset, name)
    folds = _folds_from_tests(tests, n)
    for fold, (train, _) in enumerate(pairs):
        train = np.unique(_index_array(train, n, name, fold))
        if not np.array_equal(train, np.flatnonzero(folds != fold)):
            warnings.warn(
                f"splitter {name}'s training set for fold {fold} is not every image outside "
                "that fold; kfold-ray trains each fold on all images it does not hold out",
                UserWarning,
                stacklevel=3,
            )
    return folds


def _index_array(indices: np.ndarray, n: int, name: str, fold: int) -> np.ndarray:
    if indices.dtype == np.bool_ and indices.shape == (n,):
        return np.flatnonzero(indices)
    if indices.ndim != 1 or (indices.size and indices.dtype.kind not in "iu"):
        raise ConfigError(
            f"splitter {name} fold {fold}: expected a 1-D array of image indices, got "
            f"dtype {indices.dtype} shape {indices.shape}"
        )
    indices = indices.astype(np.int64)
    if indices.size and (indices.min() < 0 or indices.max() >= n):
        raise ConfigError(f"splitter {name} fold {fold}: image indices outside 0..{n - 1}")
    return indices


def _check_partition(tests: Sequence[np.ndarray], dataset: CocoDataset, name: str) -> None:
    """Like scikit-learn's ``_check_is_permutation``: every image held out exactly once."""
    counts = np.zeros(dataset.num_images, dtype=np.int64)
    for test in tests:
        counts += np.bincount(test, minlength=dataset.num_images)
    never, repeated = np.flatnonzero(counts == 0), np.flatnonzero(counts > 1)
    if not never.size and not repeated.size:
        return
    ids = dataset.image_ids
    problems = []
    if repeated.size:
        problems.append(
            f"{repeated.size} held out more than once ({preview(ids[repeated].tolist())})"
        )
    if never.size:
        problems.append(f"{never.size} never held out ({preview(ids[never].tolist())})")
    raise ConfigError(
        f"splitter {name}'s test folds are not a partition of the images: "
        f"{'; '.join(problems)} (image ids). Out-of-fold predictions need every image held out "
        "exactly once: use a K-fold splitter (KFold, GroupKFold, StratifiedGroupKFold, ...), "
        "not a shuffle or time-series splitter"
    )
