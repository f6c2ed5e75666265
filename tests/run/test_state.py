"""The run dir's state (kfold_ray.run._state): a resume never moves a fold's checkpoint between
CPU and GPU, and a fold records what it really trained with."""

from __future__ import annotations

import json

import pytest
from cocofactory import make_coco
from fakes import EchoBackend

from kfold_ray import ResumeError, run_cv
from kfold_ray.data._dataset import load_coco


def _half_finished_cpu_run(tmp_path, dataset):
    """A finished run, then fold 1 made unfinished with a checkpoint trained on the CPU (what
    the Detectron2 backend leaves after a crash mid-training on a CPU cluster)."""
    run_dir = tmp_path / "run"
    run_cv(dataset, 2, gpus_per_fold=0, run_dir=run_dir, backend=EchoBackend(), progress=False)
    (run_dir / "parts" / "fold_001" / "DONE.json").unlink()
    work = run_dir / "folds" / "fold_001"
    work.mkdir(parents=True, exist_ok=True)
    (work / "last_checkpoint").write_text("model_0000009.pth")
    (work / "ran_with.json").write_text(json.dumps({"device": "cpu", "amp": False, "gpus": 0}))
    return run_dir


def test_resume_refuses_to_move_a_cpu_checkpoint_onto_a_gpu(ray_fake_gpus, tmp_path):
    ann, images = make_coco(tmp_path / "data", n_images=8)
    dataset = load_coco(ann, images)
    run_dir = _half_finished_cpu_run(tmp_path, dataset)
    with pytest.raises(ResumeError, match=r"fold\(s\) 1 trained on cpu \(AMP off\) and this resume "
                                          r"would go on with 0.5 GPU per fold: .* resume with "
                                          r"--gpus-per-fold 0 as the run started"):
        run_cv(dataset, 2, gpus_per_fold=0.5, run_dir=run_dir, backend=EchoBackend(),
               progress=False, resume=True)
    assert not (run_dir / "parts" / "fold_001" / "DONE.json").exists(), "refused before any fold ran"
    # The same device kind resumes; so does a fold with no record (an older run dir).
    run_cv(dataset, 2, gpus_per_fold=0, run_dir=run_dir, backend=EchoBackend(), progress=False,
           resume=True)
    assert (run_dir / "parts" / "fold_001" / "DONE.json").is_file()


def test_a_fold_without_a_record_resumes_anywhere(ray_fake_gpus, tmp_path):
    ann, images = make_coco(tmp_path / "data", n_images=8)
    dataset = load_coco(ann, images)
    run_dir = _half_finished_cpu_run(tmp_path, dataset)
    (run_dir / "folds" / "fold_001" / "ran_with.json").unlink()
    run_cv(dataset, 2, gpus_per_fold=0.5, run_dir=run_dir, backend=EchoBackend(), progress=False,
           resume=True)
    assert (run_dir / "parts" / "fold_001" / "DONE.json").is_file()
