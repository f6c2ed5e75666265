"""Run configuration: Detectron2 overrides as a flat KEY VALUE sequence or a dict (the same run,
the same fingerprint), never a bare string."""

from __future__ import annotations

import pytest
from cocofactory import make_coco

from kfold_ray import ConfigError, run_cv
from kfold_ray._config import CVConfig, TrainConfig
from kfold_ray.data._dataset import load_coco
from kfold_ray.run import _state

FLAT = ["SOLVER.MAX_ITER", "20", "SOLVER.STEPS", "(15, 18)", "MODEL.MASK_ON", "False"]
AS_DICT = {"SOLVER.MAX_ITER": 20, "SOLVER.STEPS": (15, 18), "MODEL.MASK_ON": False}


def test_a_dict_is_the_flat_sequence():
    assert TrainConfig(overrides=AS_DICT).overrides == tuple(FLAT)
    assert TrainConfig(overrides=FLAT).overrides == tuple(FLAT)
    assert TrainConfig(overrides=tuple(FLAT)) == TrainConfig(overrides=AS_DICT)


def test_the_fingerprint_does_not_depend_on_the_form(tmp_path):
    dataset = load_coco(*make_coco(tmp_path, n_images=4))
    prints = {_state.fingerprint(dataset, CVConfig(k=2, train=TrainConfig(model="tiny", overrides=o)))
              for o in (FLAT, tuple(FLAT), AS_DICT)}
    assert len(prints) == 1


@pytest.mark.parametrize("bad", ["SOLVER.MAX_ITER 10", b"SOLVER.MAX_ITER 10"])
def test_a_bare_string_is_refused_in_one_line(bad):
    with pytest.raises(ConfigError, match=r"^overrides must be a KEY VALUE sequence or a dict, not a "
                                          r"string: .*; write \['SOLVER.MAX_ITER', '10'\]"):
        TrainConfig(overrides=bad)


def test_run_cv_refuses_a_string_before_anything_is_written(tmp_path):
    ann, images = make_coco(tmp_path / "data", n_images=4)
    with pytest.raises(ConfigError, match="not a string") as err:
        run_cv(ann, 2, image_root=images, model="tiny", overrides="SOLVER.MAX_ITER 10",
               run_dir=tmp_path / "run", gpus_per_fold=0)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "run").exists()


def test_other_types_are_refused():
    with pytest.raises(ConfigError, match="got int"):
        TrainConfig(overrides=5)
    with pytest.raises(ConfigError, match="odd number of items"):
        TrainConfig(overrides=["SOLVER.MAX_ITER"])
