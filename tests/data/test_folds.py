"""Fold plans: every strategy yields a partition of the images, and errors say what is wrong."""

from __future__ import annotations

import json
import pickle
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sklearn.model_selection import GroupKFold, KFold, ShuffleSplit, StratifiedKFold

from kfold_ray.data._dataset import Category, CocoDataset
from kfold_ray._exceptions import ConfigError, DatasetError, ResumeError
from kfold_ray.data._fold_plan import FoldPlan
from kfold_ray.data._split import make_fold_plan

HYPOTHESIS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---- helpers --------------------------------------------------------------------------------
def make_dataset(
    classes_per_image: Sequence[Sequence[int]],
    *,
    num_classes: int | None = None,
    crowd_per_image: Sequence[Sequence[bool]] | None = None,
    extras: Sequence[Mapping[str, Any]] | None = None,
    image_ids: Sequence[int] | None = None,
) -> CocoDataset:
    """A CocoDataset whose image i has one box per entry of ``classes_per_image[i]``."""
    n = len(classes_per_image)
    if num_classes is None:
        num_classes = max((c for cls in classes_per_image for c in cls), default=0) + 1
    if crowd_per_image is None:
        crowd_per_image = [[False] * len(cls) for cls in classes_per_image]
    lengths = [len(cls) for cls in classes_per_image]
    m = sum(lengths)
    return CocoDataset(
        annotations_path=Path("annotations.json"),
        image_root=Path("images"),
        image_ids=np.asarray(image_ids if image_ids is not None else range(100, 100 + n), np.int64),
        file_names=tuple(f"{i}.jpg" for i in range(n)),
        widths=np.full(n, 64, np.int64),
        heights=np.full(n, 64, np.int64),
        categories=tuple(Category(id=10 + c, name=f"c{c}") for c in range(num_classes)),
        ann_offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        ann_ids=np.arange(1, m + 1, dtype=np.int64),
        boxes=np.tile(np.array([[0, 0, 10, 10]], np.float32), (m, 1)),
        classes=np.asarray([c for cls in classes_per_image for c in cls], np.int64),
        iscrowd=np.asarray([x for cr in crowd_per_image for x in cr], bool),
        image_extras=tuple(extras) if extras is not None else tuple({} for _ in range(n)),
    )


def assert_partition(plan: FoldPlan, dataset: CocoDataset) -> None:
    """The invariants every plan keeps, whatever made it."""
    n = dataset.num_images
    assert plan.fold_of_image.dtype == np.int64 and plan.fold_of_image.shape == (n,)
    assert np.array_equal(plan.image_ids, dataset.image_ids)
    held = [plan.holdout_indices(f) for f in range(plan.k)]
    # Each image held out exactly once: the holdouts concatenated are a permutation of 0..N-1.
    assert np.array_equal(np.sort(np.concatenate(held)), np.arange(n))
    for f, holdout in enumerate(held):
        train = plan.train_indices(f)
        assert holdout.dtype == np.int64 and train.dtype == np.int64
        assert holdout.size > 0 and train.size > 0
        assert np.all(np.diff(holdout) > 0) and np.all(np.diff(train) > 0)  # sorted, unique
        assert np.intersect1d(train, holdout).size == 0
        assert np.array_equal(np.union1d(train, holdout), np.arange(n))
        assert np.all(plan.fold_of_image[holdout] == f)
    assert np.array_equal(plan.fold_sizes(), [h.size for h in held])
    assert plan.fold_sizes().sum() == n


def per_fold_class_counts(plan: FoldPlan, dataset: CocoDataset) -> np.ndarray:
    """int (k, C): images holding at least one non-crowd box of class c, per fold."""
    counts = np.zeros((plan.k, dataset.num_classes), np.int64)
    for i, present in enumerate(dataset.classes_present()):
        counts[plan.fold_of_image[i], present] += 1
    return counts


def spread(counts: np.ndarray) -> np.ndarray:
    return counts.max(axis=0) - counts.min(axis=0)


@st.composite
def datasets_and_k(draw, max_images: int = 40, max_labels: int = 3):
    n = draw(st.integers(2, max_images))
    c = draw(st.integers(1, 6))
    classes = draw(
        st.lists(
            st.lists(st.integers(0, c - 1), max_size=max_labels), min_size=n, max_size=n
        )
    )
    k = draw(st.integers(2, min(n, 6)))
    seed = draw(st.integers(0, 2**32 - 1))
    return make_dataset(classes, num_classes=c), k, seed


SMALL = make_dataset([[0], [1], [0, 1], [], [2], [0], [1, 2], [], [0], [2]])


# ---- invariants, for every strategy ---------------------------------------------------------
@HYPOTHESIS
@given(datasets_and_k())
def test_kfold_is_a_balanced_partition(args):
    dataset, k, seed = args
    plan = make_fold_plan(dataset, k, seed=seed)
    assert_partition(plan, dataset)
    sizes = plan.fold_sizes()
    assert sizes.max() - sizes.min() <= 1
    assert (plan.k, plan.strategy, plan.seed) == (k, "kfold", seed)


@HYPOTHESIS
@given(datasets_and_k(), st.data())
def test_group_keeps_groups_whole(args, data):
    dataset, k, seed = args
    n = dataset.num_images
    n_groups = data.draw(st.integers(k, n))
    # Every label 0..n_groups-1 used at least once, the rest drawn at random.
    labels = list(range(n_groups)) + data.draw(
        st.lists(st.integers(0, n_groups - 1), min_size=n - n_groups, max_size=n - n_groups)
    )
    labels = data.draw(st.permutations(labels))
    plan = make_fold_plan(dataset, k, split="group", groups=labels, seed=seed)
    assert_partition(plan, dataset)
    labels = np.asarray(labels)
    for g in range(n_groups):
        assert np.unique(plan.fold_of_image[labels == g]).size == 1
    # Greedy largest-first balancing: sizes differ by at most the largest group.
    sizes = plan.fold_sizes()
    assert sizes.max() - sizes.min() <= np.bincount(labels).max()


@pytest.mark.parametrize("seed", range(5))
def test_group_places_large_groups_first(seed):
    # One group of 8 and eight singletons: largest-first greedy always ends 8 | 8, whereas
    # placing groups in a random order could end 12 | 4.
    dataset = make_dataset([[0]] * 16)
    groups = ["big"] * 8 + list(range(8))
    plan = make_fold_plan(dataset, 2, split="group", groups=groups, seed=seed)
    assert plan.fold_sizes().tolist() == [8, 8]


@HYPOTHESIS
@given(datasets_and_k())
def test_stratified_is_a_partition(args):
    dataset, k, seed = args
    assert_partition(make_fold_plan(dataset, k, split="stratified", seed=seed), dataset)


@HYPOTHESIS
@given(datasets_and_k(max_labels=1))
def test_stratified_single_label_is_balanced_per_class(args):
    # With at most one class per image, iterative stratification deals each class's images
    # round-robin: per-fold counts of every class differ by at most one.
    dataset, k, seed = args
    plan = make_fold_plan(dataset, k, split="stratified", seed=seed)
    assert spread(per_fold_class_counts(plan, dataset)).max() <= 1


@HYPOTHESIS
@given(datasets_and_k(max_labels=3))
def test_stratified_multi_label_balances_the_rarest_class(args):
    # Multi-label stratification is greedy (rarest label first), so only the label it places
    # first is guaranteed within one; later labels are balanced as far as earlier ones allow.
    dataset, k, seed = args
    plan = make_fold_plan(dataset, k, split="stratified", seed=seed)
    totals = np.zeros(dataset.num_classes, np.int64)
    for present in dataset.classes_present():
        totals[present] += 1
    positive = totals[totals > 0]
    if positive.size and np.sum(positive == positive.min()) == 1:
        rarest = int(np.flatnonzero(totals == positive.min())[0])
        assert spread(per_fold_class_counts(plan, dataset))[rarest] <= 1


def test_stratified_balances_classes_better_than_kfold():
    rng = np.random.default_rng(7)
    probs = np.array([0.5, 0.3, 0.2, 0.1, 0.05])
    classes = [np.flatnonzero(rng.random(5) < probs).tolist() for _ in range(200)]
    dataset = make_dataset(classes, num_classes=5)
    strat = spread(per_fold_class_counts(make_fold_plan(dataset, 5, split="stratified"), dataset))
    plain = spread(per_fold_class_counts(make_fold_plan(dataset, 5), dataset))
    assert strat.max() <= 2
    assert strat.sum() < plain.sum()


def test_stratified_ignores_crowd_boxes_and_accepts_images_without_boxes():
    # Class 1 appears only as crowd boxes: it must not count as present.
    dataset = make_dataset(
        [[0, 1], [], [1], [], [0], [], [0, 1], []],
        crowd_per_image=[[False, True], [], [True], [], [False], [], [False, True], []],
    )
    plan = make_fold_plan(dataset, 3, split="stratified")
    assert_partition(plan, dataset)
    counts = per_fold_class_counts(plan, dataset)
    assert counts[:, 1].sum() == 0 and spread(counts)[0] <= 1


@pytest.mark.parametrize("num_classes", [0, 1])
def test_stratified_with_fewer_than_two_classes(num_classes):
    classes = [[0] if i % 2 and num_classes else [] for i in range(9)]
    dataset = make_dataset(classes, num_classes=num_classes)
    plan = make_fold_plan(dataset, 3, split="stratified")
    assert_partition(plan, dataset)
    assert plan.fold_sizes().tolist() == [3, 3, 3]


def test_k_equal_to_number_of_images_is_leave_one_out():
    for split in ("kfold", "stratified"):
        plan = make_fold_plan(SMALL, SMALL.num_images, split=split)
        assert plan.fold_sizes().tolist() == [1] * SMALL.num_images


# ---- seeds ----------------------------------------------------------------------------------
@pytest.mark.parametrize("split", ["kfold", "group", "stratified"])
def test_same_seed_same_plan(split):
    groups = [i // 2 for i in range(SMALL.num_images)] if split == "group" else None
    a = make_fold_plan(SMALL, 3, split=split, groups=groups, seed=11)
    b = make_fold_plan(SMALL, 3, split=split, groups=groups, seed=11)
    assert a == b


def test_different_seeds_give_different_kfold_plans():
    dataset = make_dataset([[0]] * 30)
    plans = [make_fold_plan(dataset, 5, seed=s).fold_of_image for s in range(6)]
    assert len({p.tobytes() for p in plans}) == 6


def test_different_seeds_move_equal_sized_groups():
    dataset = make_dataset([[0]] * 40)
    groups = [i // 2 for i in range(40)]
    partitions = set()
    for seed in range(5):
        plan = make_fold_plan(dataset, 4, split="group", groups=groups, seed=seed)
        partitions.add(frozenset(frozenset(plan.holdout_indices(f).tolist()) for f in range(4)))
    assert len(partitions) == 5


# ---- groups from a mapping, a sequence or an image field -------------------------------------
def test_groups_from_mapping_sequence_and_field_agree():
    n = SMALL.num_images
    video = [f"v{i % 4}" for i in range(n)]
    extras = [{"video_id": v, "other": 1} for v in video]
    dataset = make_dataset([[0]] * n, extras=extras)
    by_seq = make_fold_plan(dataset, 3, split="group", groups=video, seed=3)
    by_map = make_fold_plan(
        dataset, 3, split="group", groups=dict(zip(dataset.image_ids.tolist(), video)), seed=3
    )
    by_field = make_fold_plan(dataset, 3, split="group", groups="video_id", seed=3)
    assert by_seq == by_map == by_field
    assert_partition(by_field, dataset)
    for v in set(video):
        members = [i for i in range(n) if video[i] == v]
        assert len(set(by_field.fold_of_image[members].tolist())) == 1


def test_groups_accept_numpy_arrays_and_numpy_keys():
    labels = np.arange(SMALL.num_images) % 3
    plan = make_fold_plan(SMALL, 3, split="group", groups=labels)
    mapping = {np.int64(i): g for i, g in zip(SMALL.image_ids, labels)}
    assert plan == make_fold_plan(SMALL, 3, split="group", groups=mapping)


def test_missing_image_field_names_image_and_field():
    extras = [{"video_id": 1}] * 5 + [{}] + [{"video_id": 2}] * 4
    dataset = make_dataset([[0]] * 10, extras=extras)
    with pytest.raises(DatasetError, match=r"annotations\.json: image 105 has no 'video_id' field"):
        make_fold_plan(dataset, 2, split="group", groups="video_id")


def test_unhashable_image_field_is_a_dataset_error():
    dataset = make_dataset([[0]] * 4, extras=[{"seq": [1, 2]}] * 4)
    with pytest.raises(DatasetError, match=r"image 100 has a bad 'seq' field \(a list is not"):
        make_fold_plan(dataset, 2, split="group", groups="seq")


def test_mapping_missing_an_image_names_it():
    groups = {i: 0 for i in SMALL.image_ids.tolist() if i != 104}
    with pytest.raises(ConfigError, match=r"no usable group for 1 image id\(s\): 104;"):
        make_fold_plan(SMALL, 2, split="group", groups=groups)


def test_mapping_with_string_keys_gets_a_hint():
    groups = {str(i): i % 3 for i in SMALL.image_ids.tolist()}
    match = r"10 image id\(s\): 100, .* and 5 more .*keys are strings"
    with pytest.raises(ConfigError, match=match):
        make_fold_plan(SMALL, 2, split="group", groups=groups)


def test_sequence_of_wrong_length():
    with pytest.raises(ConfigError, match=r"groups has 3 entries but the dataset has 10 images"):
        make_fold_plan(SMALL, 2, split="group", groups=[0, 1, 2])


@pytest.mark.parametrize("bad", [None, float("nan")])
def test_sequence_with_missing_group(bad):
    groups = [0, 1] * 4 + [bad, 1]
    with pytest.raises(ConfigError, match=r"no usable group for 1 image id\(s\): 108"):
        make_fold_plan(SMALL, 2, split="group", groups=groups)


def test_fewer_groups_than_k_states_both_numbers():
    with pytest.raises(ConfigError, match=r"found 2 distinct groups but k=3"):
        make_fold_plan(SMALL, 3, split="group", groups=[0, 1] * 5)


def test_group_split_without_groups():
    with pytest.raises(ConfigError, match=r"split='group' needs groups="):
        make_fold_plan(SMALL, 2, split="group")


@pytest.mark.parametrize("split", ["kfold", "stratified"])
def test_groups_with_a_split_that_ignores_them(split):
    with pytest.raises(ConfigError, match=rf"split='{split}' would ignore it"):
        make_fold_plan(SMALL, 2, split=split, groups=[0] * 10)


def test_groups_of_an_unusable_type():
    with pytest.raises(ConfigError, match=r"groups must be a mapping .* got int 5"):
        make_fold_plan(SMALL, 2, split="group", groups=5)  # type: ignore[arg-type]


# ---- scikit-learn splitter objects ----------------------------------------------------------
def test_sklearn_kfold_object_matches_its_own_folds():
    splitter = KFold(n_splits=4, shuffle=True, random_state=5)
    plan = make_fold_plan(SMALL, 4, split=splitter)
    assert plan.strategy == "custom:KFold"
    assert_partition(plan, SMALL)
    for f, (_, test) in enumerate(splitter.split(np.zeros((SMALL.num_images, 1)))):
        assert np.array_equal(plan.holdout_indices(f), np.sort(test))


def test_group_kfold_object_gets_the_groups():
    groups = [i // 2 for i in range(SMALL.num_images)]
    plan = make_fold_plan(SMALL, 3, split=GroupKFold(n_splits=3), groups=groups)
    assert plan.strategy == "custom:GroupKFold"
    assert_partition(plan, SMALL)
    for g in set(groups):
        assert len({int(plan.fold_of_image[i]) for i in range(10) if groups[i] == g}) == 1


def test_splitter_with_other_n_splits():
    with pytest.raises(ConfigError, match=r"k=3 but splitter KFold makes 4 splits .*pass k=4"):
        make_fold_plan(SMALL, 3, split=KFold(n_splits=4))


def test_splitter_that_is_not_a_partition():
    splitter = ShuffleSplit(n_splits=3, test_size=0.5, random_state=0)
    match = r"ShuffleSplit's test folds are not a partition.*held out"
    with pytest.raises(ConfigError, match=match):
        make_fold_plan(SMALL, 3, split=splitter)


def test_splitter_that_fails_names_what_it_was_given():
    # StratifiedKFold refuses the multi-label indicator kfold-ray passes as y.
    match = r"splitter StratifiedKFold failed \(ValueError: .*class-presence"
    with pytest.raises(ConfigError, match=match):
        make_fold_plan(SMALL, 2, split=StratifiedKFold(n_splits=2))


def test_splitter_class_instead_of_instance():
    with pytest.raises(ConfigError, match=r"split=KFold is a class; pass an instance"):
        make_fold_plan(SMALL, 2, split=KFold)


def test_splitter_with_an_empty_test_fold():
    class EmptyLast:
        def get_n_splits(self, X=None, y=None, groups=None):
            return 3

        def split(self, X, y=None, groups=None):
            n = len(X)
            idx = np.arange(n)
            yield idx[n // 2 :], idx[: n // 2]
            yield idx[: n // 2], idx[n // 2 :]
            yield idx, idx[:0]

    with pytest.raises(ConfigError, match=r"split='custom:EmptyLast' left fold\(s\) 2 empty"):
        make_fold_plan(SMALL, 3, split=EmptyLast())


def test_splitter_whose_train_is_not_the_complement_warns():
    class Gapped:
        def get_n_splits(self, X=None, y=None, groups=None):
            return 2

        def split(self, X, y=None, groups=None):
            idx = np.arange(len(X))
            yield idx[6:], idx[:5]
            yield idx[:5], idx[5:]

    with pytest.warns(UserWarning, match=r"Gapped's training set for fold 0 is not every image"):
        plan = make_fold_plan(SMALL, 2, split=Gapped())
    assert plan.train_indices(0).tolist() == list(range(5, 10))


# ---- argument errors ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("k", "match"),
    [
        (1, r"k=1 is out of range: need 2 <= k <= 10 \(the number of images"),
        (11, r"k=11 is out of range: need 2 <= k <= 10"),
        (2.0, r"k must be an int \(the number of folds\), got k=2.0"),
        (True, r"k must be an int"),
    ],
)
def test_bad_k(k, match):
    with pytest.raises(ConfigError, match=match):
        make_fold_plan(SMALL, k)


def test_numpy_int_k_is_fine():
    assert make_fold_plan(SMALL, np.int64(3)).k == 3


def test_single_image_dataset():
    with pytest.raises(ConfigError, match=r"need 2 <= k <= 1"):
        make_fold_plan(make_dataset([[0]]), 2)


@pytest.mark.parametrize("seed", [-1, 2**32, "0"])
def test_bad_seed(seed):
    with pytest.raises(ConfigError, match=r"seed"):
        make_fold_plan(SMALL, 2, seed=seed)


@pytest.mark.parametrize("split", ["random", "Kfold", 3])
def test_unknown_split_lists_the_choices(split):
    match = r"choose 'kfold', 'group' or 'stratified', or pass a scikit-learn splitter"
    with pytest.raises(ConfigError, match=match):
        make_fold_plan(SMALL, 2, split=split)


# ---- the FoldPlan object --------------------------------------------------------------------
def test_plan_arrays_are_read_only():
    plan = make_fold_plan(SMALL, 2)
    with pytest.raises(ValueError):
        plan.fold_of_image[0] = 1
    with pytest.raises(AttributeError):
        plan.k = 3  # type: ignore[misc]


def test_fold_out_of_range():
    plan = make_fold_plan(SMALL, 2)
    with pytest.raises(ConfigError, match=r"fold=2 is out of range: this plan has folds 0..1"):
        plan.holdout_indices(2)
    with pytest.raises(ConfigError, match=r"fold=-1"):
        plan.train_indices(-1)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(fold_of_image=[0, 1, 2]), r"fold_of_image holds fold 2, outside 0..1"),
        (dict(fold_of_image=[0, 0, 0]), r"fold\(s\) 1 hold out no image"),
        (dict(image_ids=[1, 2]), r"fold_of_image has 3 entries but image_ids has 2"),
        (dict(image_ids=[1, 1, 2]), r"image_ids repeats id\(s\) 1"),
        (dict(fold_of_image=[0.0, 1.0, 0.0]), r"fold_of_image must be a 1-D integer array"),
        (dict(strategy="bogus"), r"strategy='bogus' is not one of"),
        (dict(strategy="custom:"), r"strategy='custom:' is not one of"),
        (dict(k=1, fold_of_image=[0, 0, 0]), r"k=1 is out of range"),
    ],
)
def test_plan_constructor_validates(kwargs, match):
    args = dict(fold_of_image=[0, 1, 0], k=2, strategy="kfold", seed=0, image_ids=[1, 2, 3])
    args.update(kwargs)
    with pytest.raises(ConfigError, match=match):
        FoldPlan(**args)


def test_plan_pickles_and_repr_is_short():
    plan = make_fold_plan(SMALL, 3, split="stratified", seed=4)
    again = pickle.loads(pickle.dumps(plan))
    assert again == plan and not again.fold_of_image.flags.writeable
    assert repr(plan).startswith("FoldPlan(k=3, strategy='stratified', seed=4, num_images=10")


# ---- persistence and resume -----------------------------------------------------------------
@HYPOTHESIS
@given(datasets_and_k(), st.sampled_from(["kfold", "stratified"]))
def test_json_round_trip(args, split):
    dataset, k, seed = args
    plan = make_fold_plan(dataset, k, split=split, seed=seed)
    d = json.loads(json.dumps(plan.to_json()))
    assert FoldPlan.from_json(d) == plan
    assert d["folds"] == plan.fold_of_image.tolist()
    assert d["image_ids"] == dataset.image_ids.tolist()


def test_save_load_round_trip(tmp_path):
    plan = make_fold_plan(SMALL, 3, split=GroupKFold(n_splits=3), groups=[i % 4 for i in range(10)])
    path = tmp_path / "run" / "folds.json"
    plan.save(path)
    assert FoldPlan.load(path) == plan
    assert [p.name for p in path.parent.iterdir()] == ["folds.json"]  # no temp file left
    FoldPlan.load(str(path)).check_matches(SMALL)


def _good_json() -> dict[str, Any]:
    return make_fold_plan(SMALL, 2, seed=1).to_json()


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda d: d.pop("folds"), r"missing key\(s\) folds"),
        (lambda d: d.update(k="2"), r"'k' must be an integer, got str '2'"),
        (lambda d: d.update(seed=True), r"'seed' must be an integer"),
        (lambda d: d.update(strategy=5), r"'strategy' must be a string"),
        (lambda d: d.update(strategy="magic"), r"strategy='magic' is not one of"),
        (lambda d: d.update(folds=d["folds"][:-1]), r"'folds' has 9 entries but 'image_ids' has"),
        (lambda d: d.update(folds=[0] * 10), r"fold\(s\) 1 hold out no image"),
        (lambda d: d["folds"].__setitem__(3, 7), r"fold_of_image holds fold 7, outside 0..1"),
        (lambda d: d["image_ids"].__setitem__(3, 2.5), r"'image_ids'\[3\] must be an integer, got"),
        (lambda d: d["image_ids"].__setitem__(3, 2**70), r"beyond int64"),
        (lambda d: d.update(image_ids={}), r"'image_ids' must be a list"),
        (lambda d: d.update(version=2), r"unsupported fold plan: format '.*' version 2; this"),
    ],
)
def test_malformed_plan_json(tmp_path, edit, match):
    d = _good_json()
    edit(d)
    path = tmp_path / "folds.json"
    path.write_text(json.dumps(d))
    with pytest.raises(ResumeError, match=match) as info:
        FoldPlan.load(path)
    assert str(info.value).startswith(str(path))


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (None, r"no fold plan there"),
        ("{not json", r"the fold plan is not valid JSON"),
        ("[1, 2]", r"expected a JSON object, got list"),
        (b"\xff\xfe", r"cannot read the fold plan"),
    ],
)
def test_unreadable_plan_file(tmp_path, content, match):
    path = tmp_path / "folds.json"
    if isinstance(content, str):
        path.write_text(content)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    with pytest.raises(ResumeError, match=match):
        FoldPlan.load(path)


def test_check_matches_refuses_another_dataset():
    plan = make_fold_plan(SMALL, 2)
    plan.check_matches(SMALL)
    shorter = make_dataset([[0]] * 9)
    with pytest.raises(ResumeError, match=r"covers 10 images but the dataset has 9"):
        plan.check_matches(shorter)
    other_ids = make_dataset([[0]] * 10, image_ids=[100, 101, 102, 999] + list(range(104, 110)))
    match = r"1 image ids differ, the first at position 3 \(plan: 103, dataset: 999\)"
    with pytest.raises(ResumeError, match=match):
        plan.check_matches(other_ids)
    reordered = make_dataset([[0]] * 10, image_ids=list(range(109, 99, -1)))
    with pytest.raises(ResumeError, match=r"same image ids in a different order"):
        plan.check_matches(reordered)


def test_no_warnings_on_the_happy_path():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for split in ("kfold", "stratified"):
            make_fold_plan(SMALL, 3, split=split)
        make_fold_plan(SMALL, 3, split="group", groups=[i % 5 for i in range(10)])
