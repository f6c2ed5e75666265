"""kfold-ray: out-of-fold Detectron2 predictions for a whole COCO dataset, on Ray.

    from kfold_ray import open_run, run_cv
    result = run_cv("annotations.json", k=5)  # or open_run("runs/mine"): a finished run dir
    result.predictions, result.labels        # cleanlab object-detection formats
    result.label_issues(top=50)              # the ranking, a pandas DataFrame, worst first
    export_for_review("runs/mine", to="labelstudio", out="tasks.json")   # review the suspects
    apply_fixes("annotations.json", "label-studio-export.json")          # the corrected json

Ray, torch and Detectron2 are imported only when a run starts.
"""

from __future__ import annotations

from ._api import CVResult, apply_fixes, export_for_review, open_run, run_cv
from ._backend import FoldBackend, FoldTask, Progress
from ._config import CVConfig, FailureConfig, PredictConfig, TrainConfig
from ._exceptions import (
    ConfigError,
    DatasetError,
    FoldFailedError,
    KfoldRayError,
    ResumeError,
    StitchError,
)
from ._version import __version__
from .data._dataset import Category, CocoDataset, load_coco
from .data._example import ExampleDataset, make_digits_example
from .data._fold_plan import FoldPlan
from .data._split import make_fold_plan

__all__ = [
    "CVConfig",
    "CVResult",
    "Category",
    "CocoDataset",
    "ConfigError",
    "DatasetError",
    "ExampleDataset",
    "FailureConfig",
    "FoldBackend",
    "FoldFailedError",
    "FoldPlan",
    "FoldTask",
    "KfoldRayError",
    "PredictConfig",
    "Progress",
    "ResumeError",
    "StitchError",
    "TrainConfig",
    "__version__",
    "apply_fixes",
    "export_for_review",
    "load_coco",
    "make_digits_example",
    "make_fold_plan",
    "open_run",
    "run_cv",
]
