"""One seed, one result: each fold trains from seed + fold (Python, numpy, torch, the sampler),
so two runs with the same seed give the same predictions, and another seed other ones
(real Detectron2, tiny model, CPU)."""

from __future__ import annotations

import numpy as np
import pytest
from cocofactory import make_coco

from kfold_ray import run_cv

pytestmark = pytest.mark.slow

TINY = ["SOLVER.MAX_ITER", "3", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "1",
        "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "96",
        "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "96"]


def _predictions(ann, images, run_dir, seed: int):
    import ray

    try:
        result = run_cv(ann, 2, image_root=images, model="tiny", overrides=TINY, seed=seed,
                        gpus_per_fold=0, run_dir=run_dir, score_threshold=0.0, address="local",
                        progress=False)
    finally:
        ray.shutdown()
    table = result.table()
    return {name: table.column(name).to_numpy() for name in ("image_index", "class_index", "score",
                                                              "x1", "y1", "x2", "y2")}


def test_same_seed_same_predictions_other_seed_other_predictions(tmp_path):
    ann, images = make_coco(tmp_path / "data", n_images=6, categories=2, size=(64, 64))
    first = _predictions(ann, images, tmp_path / "a", seed=7)
    again = _predictions(ann, images, tmp_path / "b", seed=7)
    other = _predictions(ann, images, tmp_path / "c", seed=8)
    assert first["score"].size > 0
    for name in first:
        assert first[name].shape == again[name].shape, name
        np.testing.assert_allclose(first[name], again[name], atol=1e-6, err_msg=name)
    assert (first["score"].shape != other["score"].shape
            or not np.allclose(first["score"], other["score"], atol=1e-6))
