"""The driver on a real Ray cluster, with the test-only EchoBackend (no training).

Scheduling on fake GPUs, streaming while other folds still run, retries after a process dies,
deterministic failures, and the partition invariant of the stitched output.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from cocofactory import make_coco
from fakes import EchoBackend, attempts, wait_for

from kfold_ray import FoldFailedError
from kfold_ray._api import run_cv
from kfold_ray.data._dataset import load_coco




def _run_in_thread(**kwargs):
    box: dict = {}

    def target():
        try:
            box["result"] = run_cv(**kwargs)
        except BaseException as e:  # re-raised in the test
            box["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, box


@pytest.fixture
def small(tmp_path):
    ann, images = make_coco(tmp_path / "data", n_images=20, awkward=True)
    return load_coco(ann, images)


def _starts(control: Path) -> list[str]:
    return [line for line in attempts(control) if line.startswith("start")]


def test_half_gpu_folds_pack_four_on_two_fake_gpus(ray_fake_gpus, small, tmp_path):
    control = tmp_path / "control"
    control.mkdir()
    backend = EchoBackend(control_dir=str(control), pause_folds=tuple(range(5)))
    thread, box = _run_in_thread(dataset=small, k=5, gpus_per_fold=0.5, cpus_per_fold=0.5,
                                 run_dir=tmp_path / "run", backend=backend, progress=False)
    wait_for(lambda: len(_starts(control)) >= 4, what="four folds to start")
    time.sleep(2.0)  # a fifth fold would need a third half-GPU slot: it must still be waiting
    assert len(_starts(control)) == 4
    (control / "release").touch()
    thread.join(120)
    assert "error" not in box, box.get("error")
    assert len(_starts(control)) == 5


def test_batches_are_persisted_before_the_last_fold_finishes(ray_local, small, tmp_path):
    control = tmp_path / "control"
    control.mkdir()
    backend = EchoBackend(control_dir=str(control), pause_folds=(1,))
    run_dir = tmp_path / "run"
    thread, box = _run_in_thread(dataset=small, k=2, gpus_per_fold=0, run_dir=run_dir,
                                 backend=backend, progress=False, batch_size=3)
    # Fold 0 streams and finishes while fold 1 is still held back from predicting.
    wait_for(lambda: (run_dir / "parts" / "fold_000" / "DONE.json").exists(), what="fold 0 done")
    assert list((run_dir / "parts" / "fold_000").glob("*.arrow"))
    assert not list((run_dir / "parts").glob("fold_001/*.arrow"))
    assert not (run_dir / "predictions.parquet").exists()
    (control / "release").touch()
    thread.join(120)
    assert "error" not in box, box.get("error")
    assert (run_dir / "predictions.parquet").exists()


def test_stitched_output_is_a_partition_in_dataset_order(ray_local, small, tmp_path):
    result = run_cv(small, 4, gpus_per_fold=0, run_dir=tmp_path / "run", backend=EchoBackend(),
                    progress=False, batch_size=4)
    table = pq.read_table(result.run_dir / "predictions.parquet")
    image_index = table.column("image_index").to_numpy()
    assert np.all(np.diff(image_index) >= 0), "rows are in dataset order"
    # Every image got its one false positive: each predicted once, by the fold that held it out.
    fp = table.filter(table.column("score").to_numpy() < 0.5)
    assert sorted(fp.column("image_index").to_pylist()) == list(range(small.num_images))
    folds = fp.column("fold").to_numpy()
    assert np.array_equal(folds[np.argsort(fp.column("image_index").to_numpy())], result.fold_of_image)
    assert len(result.predictions) == small.num_images


def test_a_fold_whose_process_dies_is_restarted_and_completes(ray_local, small, tmp_path):
    control = tmp_path / "control"
    control.mkdir()
    backend = EchoBackend(control_dir=str(control), crash_fold=1, crash_at=("predict", 3))
    result = run_cv(small, 3, gpus_per_fold=0, run_dir=tmp_path / "run", backend=backend,
                    progress=False, batch_size=3)
    starts = _starts(control)
    fold1 = [s for s in starts if "fold=1" in s]
    assert len(fold1) == 2 and "attempt=1" in fold1[1]
    # The retry only predicts what the first attempt had not persisted yet.
    n_holdout = len(result.plan.holdout_indices(1))
    assert f"n={n_holdout}" in fold1[0] and f"n={n_holdout - 3}" in fold1[1]
    assert result.metrics["folds_run"]["1"]["attempts"] == 2
    table = result.table()
    fp = table.filter(table.column("score").to_numpy() < 0.5)
    assert sorted(fp.column("image_index").to_pylist()) == list(range(small.num_images))


def test_a_fold_that_always_fails_fails_fast_naming_fold_and_cause(ray_local, small, tmp_path):
    backend = EchoBackend(fail_fold=2)
    with pytest.raises(FoldFailedError, match=r"fold 2 failed after 2 attempts: RuntimeError: deterministic failure in fold 2"):
        run_cv(small, 3, gpus_per_fold=0, run_dir=tmp_path / "run", backend=backend,
               progress=False, max_retries=1)
    assert not (tmp_path / "run" / "predictions.parquet").exists()
