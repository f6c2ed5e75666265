"""The public API is exactly kfold_ray.__all__; errors form one hierarchy and pickle across processes."""

from __future__ import annotations

import pickle

import pytest

import kfold_ray
from kfold_ray import (
    ConfigError,
    DatasetError,
    FoldFailedError,
    KfoldRayError,
    ResumeError,
    StitchError,
)
from kfold_ray._exceptions import FoldOutOfMemoryError


def test_all_is_pinned():
    assert sorted(kfold_ray.__all__) == sorted([
        "CVConfig", "CVResult", "Category", "CocoDataset", "ConfigError", "DatasetError",
        "ExampleDataset", "FailureConfig", "FoldBackend", "FoldFailedError", "FoldPlan",
        "FoldTask", "KfoldRayError", "PredictConfig", "Progress", "ResumeError", "StitchError",
        "TrainConfig", "__version__", "apply_fixes", "export_for_review", "load_coco", "make_digits_example", "make_fold_plan",
        "open_run", "run_cv",
    ])
    for name in kfold_ray.__all__:
        assert hasattr(kfold_ray, name), name


@pytest.mark.parametrize("error", [
    DatasetError("images[0] (id 1): missing 'file_name'", path="/x/a.json"),
    ConfigError("k must be an integer >= 2, got 1"),
    ResumeError("run dir made from another dataset"),
    FoldFailedError(3, "RuntimeError: boom", attempts=2),
    FoldOutOfMemoryError(1, "predicting", 8, "lower --batch-size"),
    StitchError("2 images missing", missing=[4, 5], duplicated=[1], wrong_fold=[7]),
])
def test_errors_pickle_and_share_one_root(error):
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is type(error) and str(again) == str(error)
    assert vars(again) == vars(error)
    assert isinstance(again, KfoldRayError)


def test_bad_input_errors_are_value_errors():
    for cls in (DatasetError, ConfigError, ResumeError):
        assert issubclass(cls, ValueError)
    assert not issubclass(FoldFailedError, ValueError)
