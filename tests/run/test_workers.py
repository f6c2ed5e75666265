"""Folds trained by several workers (Ray Train TorchTrainer, DDP over gloo on CPU; kfold_ray.run._workers).

Real Ray Train, real Detectron2 (tiny model, a few iterations, 64 px images). The GPU case is the
same code with NCCL; it is measured on a GPU machine (benchmarks/), not tested here.
"""

from __future__ import annotations

import json
import os
import signal
import threading

import numpy as np
import pyarrow.parquet as pq
import pytest
from cocofactory import make_coco
from fakes import wait_for

from kfold_ray import ConfigError, run_cv
from kfold_ray._backend import FoldWorker, worker_share
from kfold_ray.data._dataset import load_coco
from kfold_ray._exceptions import ImageReadError
from kfold_ray.run._parts import FoldPartStore
from kfold_ray.run._workers import worker_error

pytestmark = pytest.mark.slow

TINY = ["SOLVER.MAX_ITER", "6", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "2",
        "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "96",
        "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "96"]


@pytest.fixture
def ray_4cpus():
    """Local Ray advertising 4 CPUs: two folds of two one-CPU workers side by side."""
    from clusters import init_local_ray

    ray = init_local_ray(num_cpus=4)
    yield ray
    ray.shutdown()


def test_a_fold_trained_by_two_workers_is_one_model_and_stitches_like_any_fold(ray_4cpus, tmp_path):
    ann, images = make_coco(tmp_path / "data", n_images=10, categories=2, size=(64, 64))
    result = run_cv(ann, 2, image_root=images, model="tiny", overrides=TINY, gpus_per_fold=0,
                    workers_per_fold=2, run_dir=tmp_path / "run", score_threshold=0.0,
                    progress=False)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["launch"]["workers_per_fold"] == 2
    for fold, info in metrics["folds_run"].items():
        assert info["workers"] == 2, (fold, info)
        # Both ranks end with the same parameters AND buffers (BatchNorm statistics): the
        # predictions of either are those of the fold's checkpoint.
        assert len(info["weights"]) == 2 and info["weights"][0] == info["weights"][1], info
    assert metrics["folds_run"]["0"]["weights"][0] != metrics["folds_run"]["1"]["weights"][0]

    table = pq.read_table(tmp_path / "run" / "predictions.parquet")
    dataset = load_coco(ann, images)
    assert sorted(set(table.column("image_id").to_pylist())) == sorted(dataset.image_ids.tolist())
    # Both workers' shares were persisted as the fold's parts, all made by one model: the
    # fold's final checkpoint (rank 0 wrote it; rank 1 names it too).
    store = FoldPartStore(tmp_path / "run")
    for fold in (0, 1):
        models = store.models(fold)
        assert len(models) == 1 and next(iter(models)).startswith("model_final.pth:"), models
        assert sorted(store.covered_images(fold).tolist()) == sorted(result.plan.holdout_indices(fold).tolist())
    log = (tmp_path / "run" / "folds" / "fold_000" / "log.txt").read_text()
    assert "(worker 0 of 2): resuming from nothing" in log, log[-2000:]


def test_killing_one_worker_mid_training_resumes_the_fold_from_its_checkpoint(ray_4cpus, tmp_path):
    ann, images = make_coco(tmp_path / "data", n_images=10, categories=2, size=(64, 64))
    run_dir = tmp_path / "run"
    slow = [*TINY, "SOLVER.MAX_ITER", "24"]
    killed: list[int] = []

    def kill_a_worker_after_the_first_checkpoints() -> None:
        wait_for(lambda: all((run_dir / "folds" / f"fold_00{f}" / "last_checkpoint").is_file()
                             for f in (0, 1)), 600, "both folds' first checkpoint")
        pid = _train_worker_pids()[0]
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

    killer = threading.Thread(target=kill_a_worker_after_the_first_checkpoints, daemon=True)
    killer.start()
    result = run_cv(ann, 2, image_root=images, model="tiny", overrides=slow, gpus_per_fold=0,
                    workers_per_fold=2, run_dir=run_dir, checkpoint_period=2, progress=False)
    killer.join(timeout=5)
    assert killed, "no worker was killed"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    retried = [f for f, info in metrics["folds_run"].items() if info["attempts"] > 1]
    assert len(retried) == 1, metrics["folds_run"]
    info = metrics["folds_run"][retried[0]]
    assert info["attempts"] == 2 and info["workers"] == 2, info
    assert info["weights"][0] == info["weights"][1], info
    log = (run_dir / "folds" / f"fold_{int(retried[0]):03d}" / "log.txt").read_text()
    resumed_at = [line for line in log.splitlines() if "resumes training at iteration" in line]
    assert resumed_at and int(resumed_at[-1].split("iteration ")[1].split()[0]) >= 2, log[-3000:]
    assert result.metrics["pooled"]["num_images"] == 10  # every image, once (the stitch checks)


def _train_worker_pids() -> list[int]:
    """Processes of this test's Ray cluster running a Ray Train worker (children of its raylet;
    other Ray clusters may run on this machine)."""
    import psutil
    import ray

    session = ray._private.worker._global_node.session_name
    pids = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if "RayTrainWorker" in " ".join(p.info["cmdline"] or ()) and \
                    session in " ".join(p.parent().cmdline()):
                pids.append(p.pid)
        except (psutil.Error, AttributeError):
            continue
    assert pids, "no Ray Train worker process found"
    return sorted(pids)


def test_the_total_batch_must_divide_among_the_workers_before_any_fold_starts(tmp_path):
    ann, images = make_coco(tmp_path / "data", n_images=6, categories=2, size=(64, 64))
    with pytest.raises(ConfigError, match=r"SOLVER.IMS_PER_BATCH 3 is the total batch of a fold's "
                                          r"2 workers .*\(--opts SOLVER.IMS_PER_BATCH 2\)"):
        run_cv(ann, 2, image_root=images, model="tiny", overrides=[*TINY, "SOLVER.IMS_PER_BATCH", "3"],
               gpus_per_fold=0, workers_per_fold=2, run_dir=tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_worker_shares_are_disjoint_and_cover_the_held_out_images():
    ordered = np.arange(11, dtype=np.int64)[::-1]
    shares = [worker_share(ordered, FoldWorker(r, 3, r, 3, 0)) for r in range(3)]
    assert sorted(np.concatenate(shares).tolist()) == list(range(11))
    assert [len(s) for s in shares] == [4, 4, 3]
    assert worker_share(ordered, None) is ordered


def test_the_fold_fails_with_the_workers_own_error_not_the_collateral_ones():
    from ray.exceptions import ActorDiedError
    from ray.train import WorkerGroupError

    own = ImageReadError("node-x", "s3://b/i.jpg", "FileNotFoundError")
    error = WorkerGroupError("two workers failed", {0: RuntimeError("gloo: connection closed"),
                                                    1: own, 2: ActorDiedError()})
    assert worker_error(error) is own
    died = ActorDiedError()
    assert worker_error(WorkerGroupError("x", {1: died})) is died
    plain = ValueError("not from Ray Train")
    assert worker_error(plain) is plain
