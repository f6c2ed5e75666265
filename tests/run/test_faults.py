"""Nothing lost: faults injected for real (processes killed, nodes removed, drivers SIGKILLed)."""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import subprocess
import sys
import threading

import numpy as np
import psutil
import pyarrow.parquet as pq
import pytest
from cocofactory import make_coco
from fakes import EchoBackend, attempts, wait_for

from kfold_ray import FoldFailedError, ResumeError, run_cv
from kfold_ray.data._dataset import CocoDataset, Category, load_coco




@pytest.fixture
def small(tmp_path):
    ann, images = make_coco(tmp_path / "data", n_images=20, awkward=True)
    return load_coco(ann, images)


def _false_positive_images(table) -> list[int]:
    """EchoBackend adds one score-0.1 box per predicted image: one per image means 'exactly once'."""
    fp = table.filter(table.column("score").to_numpy() < 0.5)
    return sorted(fp.column("image_index").to_pylist())


def test_out_of_memory_is_not_retried_and_says_what_to_lower(ray_local, small, tmp_path):
    with pytest.raises(FoldFailedError, match=r"fold 1 failed: FoldOutOfMemoryError: fold 1 ran out of GPU memory while predicting \(batch size 4\): lower --batch-size"):
        run_cv(small, 2, gpus_per_fold=0, run_dir=tmp_path / "run", backend=EchoBackend(oom_fold=1),
               progress=False, batch_size=4, max_retries=3)


def test_errors_that_will_recur_are_tried_once_others_again(ray_local, small, tmp_path):
    """A model without a method it needs (Cascade R-CNN's heads in an older kfold-ray), a NaN
    loss, a missing key: a retry meets them again, so none is retried. A storage hiccup
    (OSError) may pass: it is."""
    control = tmp_path / "control"
    control.mkdir()
    errors = {1: NotImplementedError, 2: FloatingPointError, 3: OSError, 4: KeyError}
    with pytest.raises(FoldFailedError) as info:
        run_cv(small, 5, gpus_per_fold=0, run_dir=tmp_path / "run", progress=False, max_retries=2,
               backend=EchoBackend(control_dir=str(control), fail_with=errors))
    assert [(f, attempts_) for f, _, attempts_ in info.value.failures] == [(1, 1), (2, 1), (3, 3), (4, 1)]
    assert [cause.split(":")[0] for _, cause, _ in info.value.failures] == [
        "NotImplementedError", "FloatingPointError", "OSError", "KeyError"]
    tries = [line.split()[1] for line in attempts(control)]
    assert {f: tries.count(f"fold={f}") for f in range(5)} == {0: 1, 1: 1, 2: 1, 3: 3, 4: 1}


def test_resume_with_other_config_or_dataset_is_refused(ray_local, small, tmp_path):
    run_dir = tmp_path / "run"
    run_cv(small, 3, gpus_per_fold=0, run_dir=run_dir, backend=EchoBackend(), progress=False)
    with pytest.raises(ResumeError, match=r"made from another dataset or configuration"):
        run_cv(small, 3, seed=1, gpus_per_fold=0, run_dir=run_dir, backend=EchoBackend(),
               progress=False, resume=True)
    ann, images = make_coco(tmp_path / "other", n_images=20, seed=5)
    with pytest.raises(ResumeError, match=r"made from another dataset or configuration"):
        run_cv(load_coco(ann, images), 3, gpus_per_fold=0, run_dir=run_dir, backend=EchoBackend(),
               progress=False, resume=True)
    with pytest.raises(ResumeError, match=r"no run to resume here"):
        run_cv(small, 3, gpus_per_fold=0, run_dir=tmp_path / "empty", backend=EchoBackend(),
               progress=False, resume=True)


def test_a_new_run_refuses_a_non_empty_run_dir(ray_local, small, tmp_path):
    run_dir = tmp_path / "run"
    run_cv(small, 2, gpus_per_fold=0, run_dir=run_dir, backend=EchoBackend(), progress=False)
    with pytest.raises(ValueError, match=r"is not empty: pass --resume"):
        run_cv(small, 2, gpus_per_fold=0, run_dir=run_dir, backend=EchoBackend(), progress=False)


def test_resume_skips_finished_folds(ray_local, small, tmp_path):
    control = tmp_path / "control"
    control.mkdir()
    run_dir = tmp_path / "run"
    # First call: fold 2 always fails, so the run stops with folds 0 and 1 done.
    with pytest.raises(FoldFailedError):
        run_cv(small, 3, gpus_per_fold=0, run_dir=run_dir, progress=False, max_retries=0,
               backend=EchoBackend(control_dir=str(control), fail_fold=2))
    assert not (run_dir / "predictions.parquet").exists()
    done = sorted(p.parent.name for p in run_dir.glob("parts/*/DONE.json"))
    assert done == ["fold_000", "fold_001"]
    (control / "attempts.log").unlink()
    result = run_cv(small, 3, gpus_per_fold=0, run_dir=run_dir, progress=False, resume=True,
                    max_retries=0, backend=EchoBackend(control_dir=str(control)))
    assert [line.split()[1] for line in attempts(control)] == ["fold=2"], "only fold 2 runs again"
    assert _false_positive_images(result.table()) == list(range(small.num_images))


def test_node_loss_moves_folds_to_other_nodes(ray_cluster, small, tmp_path):
    cluster, workers = ray_cluster
    control = tmp_path / "control"
    control.mkdir()
    backend = EchoBackend(control_dir=str(control), pause_folds=(0, 1, 2, 3))
    box: dict = {}

    def target():
        try:
            box["result"] = run_cv(small, 4, gpus_per_fold=0.5, cpus_per_fold=0.5,
                                   run_dir=tmp_path / "run", backend=backend, progress=False,
                                   max_retries=2)
        except BaseException as e:
            box["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    wait_for(lambda: len(attempts(control)) >= 4, what="4 folds started on the 2 GPU nodes")
    cluster.remove_node(workers[0])  # two of the folds lose their node
    cluster.add_node(num_cpus=2, num_gpus=1)  # a replacement node joins (as an autoscaler would add)
    wait_for(lambda: len(attempts(control)) >= 6, what="the lost folds to start again")
    (control / "release").touch()
    thread.join(240)
    assert "error" not in box, box.get("error")
    result = box["result"]
    assert sum(v["attempts"] for v in result.metrics["folds_run"].values()) == 6
    assert _false_positive_images(result.table()) == list(range(small.num_images))


def test_load_20k_images_with_bounded_memory(ray_local, tmp_path):
    """20,000 images through the real stream and reducer with the fast test backend."""
    n = 20_000
    rng = np.random.default_rng(0)
    per_image = rng.integers(0, 4, n)
    offsets = np.concatenate([[0], np.cumsum(per_image)])
    m = int(offsets[-1])
    xy = rng.uniform(0, 40, (m, 2)).astype(np.float32)
    dataset = CocoDataset(
        annotations_path=tmp_path / "synthetic.json", image_root=tmp_path,
        image_ids=np.arange(1, n + 1, dtype=np.int64), file_names=tuple(f"{i}.png" for i in range(n)),
        widths=np.full(n, 64), heights=np.full(n, 64),
        categories=tuple(Category(id=i + 1, name=str(i)) for i in range(5)),
        ann_offsets=offsets, ann_ids=np.arange(m, dtype=np.int64),
        boxes=np.hstack([xy, xy + 16]), classes=rng.integers(0, 5, m),
        iscrowd=np.zeros(m, bool), fingerprint="synthetic-20k",
    )
    rss_before = psutil.Process().memory_info().rss
    result = run_cv(dataset, 4, gpus_per_fold=0, run_dir=tmp_path / "run", batch_size=64,
                    backend=EchoBackend(train_steps=1), progress=False)
    table = result.table()
    assert table.num_rows == m + n
    assert _false_positive_images(table) == list(range(n))
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    grown_mb = (psutil.Process().memory_info().rss - rss_before) / 2**20
    store = __import__("ray").available_resources().get("object_store_memory", 0)
    print(f"\n20k-image load: driver peak RSS {peak_mb:.0f} MiB, grew {grown_mb:.0f} MiB; "
          f"object store free {store / 2**20:.0f} MiB")
    assert grown_mb < 1024, "the driver must not hold predictions many times over"


@pytest.mark.slow
def test_killed_fold_process_resumes_training_from_its_checkpoint(ray_local, tmp_path):
    ann, images = make_coco(tmp_path / "data", n_images=8)
    run_dir = tmp_path / "run"
    box: dict = {}

    def target():
        try:
            box["result"] = run_cv(
                ann, 2, image_root=images, model="tiny", gpus_per_fold=0, run_dir=run_dir,
                overrides=["SOLVER.MAX_ITER", "12", "SOLVER.IMS_PER_BATCH", "2"],
                checkpoint_period=3, progress=False, batch_size=4)
        except BaseException as e:
            box["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    checkpoint = run_dir / "folds" / "fold_000" / "last_checkpoint"
    wait_for(checkpoint.exists, what="fold 0's first checkpoint")
    # Only this test's cluster: Ray's local processes are descendants of this process.
    victims = [p for p in psutil.Process().children(recursive=True)
               if any("FoldActor" in part for part in p.cmdline())]
    assert victims, "fold actor processes are visible"
    for p in victims:
        os.kill(p.pid, signal.SIGKILL)
    thread.join(600)
    assert "error" not in box, box.get("error")
    result = box["result"]
    assert result.metrics["folds_run"]["0"]["attempts"] == 2
    log = (run_dir / "folds" / "fold_000" / "log.txt").read_text()
    assert "Loading from" in log and "model_00000" in log, "the retry loaded a checkpoint"
    assert len(result.predictions) == 8


@pytest.mark.slow
def test_a_fold_killed_mid_upload_resumes_from_the_previous_checkpoint(ray_local, tmp_path):
    """Checkpoints upload in the background while training goes on: a fold process killed halfway
    through uploading one (model_0000003) resumes from the one before it (model_0000001), which
    storage still names and holds whole; nothing is lost, nothing half-written stays."""
    from fakes import KillMidUploadBackend

    ann, images = make_coco(tmp_path / "data", n_images=8, categories=2, size=(64, 64))
    control = tmp_path / "control"
    control.mkdir()
    run_dir = tmp_path / "run"
    result = run_cv(ann, 2, image_root=images, model="tiny", gpus_per_fold=0, run_dir=run_dir,
                    overrides=["SOLVER.MAX_ITER", "6", "SOLVER.IMS_PER_BATCH", "2",
                               "SOLVER.WARMUP_ITERS", "2", "INPUT.MIN_SIZE_TRAIN", "(64,)",
                               "INPUT.MAX_SIZE_TRAIN", "96", "INPUT.MIN_SIZE_TEST", "64",
                               "INPUT.MAX_SIZE_TEST", "96"],
                    checkpoint_period=2, keep_checkpoints=5, progress=False, score_threshold=0.0,
                    backend=KillMidUploadBackend(str(control)))
    assert "killed while uploading model_0000003.pth" in (control / "killed").read_text()
    assert result.metrics["folds_run"]["0"]["attempts"] == 2
    assert result.metrics["folds_run"]["1"]["attempts"] == 1
    fold = run_dir / "folds" / "fold_000"
    log = (fold / "log.txt").read_text()
    assert re.search(r"attempt 1 on node .*: resuming from \S*model_0000001\.pth", log), log[-3000:]
    assert "resumes training at iteration 2 of 6" in log
    stored = sorted(p.name for p in fold.iterdir())
    assert stored == ["last_checkpoint", "log.txt", "model_0000001.pth", "model_0000003.pth",
                      "model_final.pth", "ran_with.json"], stored  # the half-written upload's temp file is gone
    assert (fold / "last_checkpoint").read_text().strip() == "model_final.pth"
    table = pq.read_table(run_dir / "predictions.parquet")  # stitched: each image exactly once
    assert sorted(set(table.column("image_index").to_pylist())) == list(range(8))


@pytest.mark.slow
def test_driver_sigkill_then_resume_finishes_without_redoing_folds(tmp_path):
    ann, images = make_coco(tmp_path / "data", n_images=8)
    args = ["-m", "kfold_ray._cli", "run", "--annotations", str(ann), "--images", str(images),
            "-k", "2", "--model", "tiny", "--gpus-per-fold", "0", "--cpus-per-fold", "2",
            "--opts", "SOLVER.MAX_ITER", "4", "SOLVER.IMS_PER_BATCH", "2", "--quiet"]
    env = {**os.environ, "RAY_ADDRESS": ""}
    run_dir = tmp_path / "run"
    # cpus-per-fold 2 on this 2-CPU machine: folds run one after another, so a fold is done
    # while the other has not finished.
    proc = subprocess.Popen([sys.executable, *args, "--run-dir", str(run_dir)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(lambda: any(run_dir.glob("parts/*/DONE.json")), timeout_s=400, what="one fold done")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done_before = {p: p.stat().st_mtime_ns for p in run_dir.glob("parts/*/DONE.json")}
    assert len(done_before) == 1 and not (run_dir / "predictions.parquet").exists()
    resumed = subprocess.run([sys.executable, *args, "--run-dir", str(run_dir), "--resume"],
                             env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    for p, mtime in done_before.items():
        assert p.stat().st_mtime_ns == mtime, "a finished fold was not redone"
    fresh = subprocess.run([sys.executable, *args, "--run-dir", str(tmp_path / "fresh")],
                           env=env, capture_output=True, text=True, timeout=600)
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    a = pq.read_table(run_dir / "predictions.parquet")
    b = pq.read_table(tmp_path / "fresh" / "predictions.parquet")
    assert json.loads((run_dir / "folds.json").read_text()) == json.loads((tmp_path / "fresh" / "folds.json").read_text())
    assert a.num_rows == b.num_rows
    assert a.column("image_index").to_pylist() == b.column("image_index").to_pylist()
    assert a.column("fold").to_pylist() == b.column("fold").to_pylist()


def test_failed_folds_sink_no_other_and_resume_redoes_only_them(ray_local, small, tmp_path):
    control = tmp_path / "control"
    control.mkdir()
    run_dir = tmp_path / "run"
    with pytest.raises(FoldFailedError) as info:
        run_cv(small, 3, gpus_per_fold=0, run_dir=run_dir, progress=False, max_retries=1,
               backend=EchoBackend(control_dir=str(control), oom_fold=1, fail_fold=2, step_s=0.05))
    assert [f for f, _, _ in info.value.failures] == [1, 2]
    assert str(info.value).startswith("fold 1 failed: FoldOutOfMemoryError: fold 1 ran out of GPU memory")
    assert "; fold 2 failed after 2 attempts: RuntimeError: deterministic failure in fold 2" in str(info.value)
    assert (run_dir / "parts" / "fold_000" / "DONE.json").is_file(), "fold 0 ran to the end"
    (control / "attempts.log").unlink()
    result = run_cv(small, 3, gpus_per_fold=0, run_dir=run_dir, progress=False, resume=True,
                    backend=EchoBackend(control_dir=str(control)))
    assert sorted(line.split()[1] for line in attempts(control)) == ["fold=1", "fold=2"]
    assert _false_positive_images(result.table()) == list(range(small.num_images))


def test_a_retry_that_trains_again_discards_the_earlier_model_s_parts(ray_local, small, tmp_path):
    from kfold_ray.run._parts import FoldPartStore

    control = tmp_path / "control"
    control.mkdir()
    result = run_cv(small, 2, gpus_per_fold=0, run_dir=tmp_path / "run", progress=False,
                    batch_size=2, backend=EchoBackend(control_dir=str(control), crash_fold=1,
                                                      crash_at=("predict", 4),
                                                      new_model_each_attempt=True))
    store = FoldPartStore(tmp_path / "run")
    assert store.models(0) == {"attempt0"}
    assert store.models(1) == {"attempt1"}, "the first model's parts are gone"
    assert sorted(line.split()[2] for line in attempts(control) if "fold=1" in line) == [
        "attempt=0", "attempt=1"]
    assert _false_positive_images(result.table()) == list(range(small.num_images))


def test_exclude_unreadable_leaves_images_out_of_every_output(ray_local, tmp_path):
    from kfold_ray import DatasetError

    ann, images = make_coco(tmp_path / "data", n_images=10)
    (images / "img_00003.png").unlink()
    with pytest.raises(DatasetError, match=r'file "img_00003.png" not found'):
        run_cv(ann, 2, image_root=images, gpus_per_fold=0, backend=EchoBackend(),
               run_dir=tmp_path / "refused", progress=False)
    assert not (tmp_path / "refused").exists()
    with pytest.warns(UserWarning, match="img_00003.png"):
        result = run_cv(ann, 2, image_root=images, gpus_per_fold=0, backend=EchoBackend(),
                        run_dir=tmp_path / "run", progress=False, exclude_unreadable=True)
    excluded = json.loads((result.run_dir / "excluded_images.json").read_text())
    assert [e["file_name"] for e in excluded] == ["img_00003.png"] and "not found" in excluded[0]["reason"]
    gone = excluded[0]["image_id"]
    assert result.dataset.num_images == 9 and gone not in result.image_ids.tolist()
    assert gone not in result.table().column("image_id").to_pylist()
    assert len(result.predictions) == 9


def test_a_fold_whose_stream_ends_early_is_never_done(ray_local, small, tmp_path):
    with pytest.raises(FoldFailedError, match=r"fold 1 failed after 2 attempts: StreamEndedEarly: fold 1 "
                                              r"stopped with 1 held-out images unpredicted"):
        run_cv(small, 2, gpus_per_fold=0, run_dir=tmp_path / "run", progress=False, max_retries=1,
               backend=EchoBackend(skip_image_of_fold=1))
    assert (tmp_path / "run" / "parts" / "fold_000" / "DONE.json").is_file()
    assert not (tmp_path / "run" / "parts" / "fold_001" / "DONE.json").exists()


def test_resume_may_change_how_the_run_is_scheduled(ray_local, small, tmp_path):
    run_dir = tmp_path / "run"
    with pytest.raises(FoldFailedError):
        run_cv(small, 3, gpus_per_fold=0, run_dir=run_dir, progress=False, max_retries=0,
               backend=EchoBackend(fail_fold=2))
    # GPUs, CPUs, retries, checkpoints and batch size do not decide the predictions.
    result = run_cv(small, 3, gpus_per_fold=0, cpus_per_fold=0.5, run_dir=run_dir, progress=False,
                    resume=True, max_retries=3, batch_size=3, checkpoint_period=7,
                    keep_checkpoints=1, backend=EchoBackend())
    assert _false_positive_images(result.table()) == list(range(small.num_images))


def test_resume_reads_the_fold_plan_back_even_from_an_unseeded_splitter(ray_local, small, tmp_path):
    run_dir = tmp_path / "run"

    class UnseededKFold:  # a custom splitter whose folds change from call to call
        def split(self, X, y=None, groups=None):
            order = np.random.permutation(len(X))
            for f in range(3):
                held = order[f::3]
                yield np.setdiff1d(order, held), held

        def get_n_splits(self, *args):
            return 3

    with pytest.raises(FoldFailedError):
        run_cv(small, 3, split=UnseededKFold(), gpus_per_fold=0, run_dir=run_dir, progress=False,
               max_retries=0, backend=EchoBackend(fail_fold=2))
    planned = json.loads((run_dir / "folds.json").read_text())["folds"]
    result = run_cv(small, 3, split=UnseededKFold(), gpus_per_fold=0, run_dir=run_dir,
                    progress=False, resume=True, backend=EchoBackend())
    assert result.fold_of_image.tolist() == planned
