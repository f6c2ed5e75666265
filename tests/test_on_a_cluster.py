"""kfold-ray on clusters whose nodes share nothing but the network and S3 (tests/clusters.py).

The worker nodes run in private mount namespaces: the driver's data and run folders are an empty
tmpfs there. Storage is a real S3 endpoint (moto's server on 127.0.0.1) reached through pyarrow's
own S3 client, configured only by the standard AWS variables, as on AWS. Folds train for real
(Detectron2, tiny model, CPU: the workers' GPUs are fake, for scheduling only) unless the test is
about orchestration only (tests/fakes.py's EchoBackend).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cocofactory import make_coco
from fakes import attempts, wait_for

from kfold_ray import FoldFailedError, run_cv

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

TINY = ["SOLVER.MAX_ITER", "6", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "2",
        "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "96",
        "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "96"]


def upload_dataset(s3, root: Path, prefix: str = "data") -> tuple[str, str]:
    """Copy a local COCO folder (annotations.json + images/) to the bucket; (json URI, image URI)."""
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        s3.write(f"{prefix}/{f.relative_to(root).as_posix()}", f.read_bytes())
    return s3.uri(prefix, "annotations.json"), s3.uri(prefix, "images")


def cli(*args: str, env: dict[str, str], cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kfold_ray._cli", *args], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=timeout)


def test_a_full_run_with_data_and_run_dir_on_s3(private_cluster, tmp_path):
    s3 = private_cluster.s3
    cwd = tmp_path / "cwd"  # the driver's working directory: nothing may land here
    cwd.mkdir()
    ann, _ = make_coco(private_cluster.driver_only_dir / "data", n_images=8, categories=2,
                       size=(64, 64))
    ann_uri, images_uri = upload_dataset(s3, ann.parent)
    run_uri = s3.uri("runs", "first")
    done = cli("run", "--annotations", ann_uri, "--images", images_uri, "-k", "2",
               "--run-dir", run_uri, "--model", "tiny", "--checkpoint-period", "3",
               "--opts", *TINY, env=private_cluster.driver_env(address=True), cwd=cwd)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "(joined)" in done.stderr, done.stderr[-2000:]
    keys = set(s3.keys("runs/first/"))
    for name in ("run.json", "config.json", "folds.json", "metrics.json", "predictions.parquet",
                 "cleanlab_predictions.pkl", "cleanlab_labels.pkl", "coco_results.json",
                 "categories.json", "parts/fold_000/DONE.json", "parts/fold_001/DONE.json",
                 "folds/fold_000/log.txt", "folds/fold_001/log.txt",
                 "folds/fold_000/last_checkpoint", "folds/fold_001/model_final.pth"):
        assert f"runs/first/{name}" in keys, (name, sorted(keys))
    assert json.loads(s3.read("runs/first/run.json"))["status"] == "finished"
    metrics = json.loads(s3.read("runs/first/metrics.json"))
    assert metrics["launch"]["gpus_per_fold"] == 1.0 and metrics["launch"]["cpus_per_fold"] == 2.0
    # Nothing landed on the driver's disk: no folder named after the URI, no relative run dir.
    assert list(cwd.iterdir()) == []

    # The report reads and writes the S3 run dir too.
    report = cli("report", run_uri, "--top", "3", env=private_cluster.driver_env(), cwd=cwd)
    assert report.returncode == 0, report.stderr[-3000:]
    keys = set(s3.keys("runs/first/"))
    assert {"runs/first/label_issues.parquet", "runs/first/report/index.html"} <= keys
    assert list(cwd.iterdir()) == []


def test_a_fold_whose_node_dies_resumes_on_a_new_node_from_its_uploaded_checkpoint(
        private_cluster, tmp_path):
    s3 = private_cluster.s3
    ann, _ = make_coco(private_cluster.driver_only_dir / "data", n_images=8, categories=2,
                       size=(64, 64))
    ann_uri, images_uri = upload_dataset(s3, ann.parent)
    run_uri = s3.uri("runs", "node-loss")
    slow = [*TINY, "SOLVER.MAX_ITER", "16"]
    driver = subprocess.Popen(
        [sys.executable, "-m", "kfold_ray._cli", "run", "--annotations", ann_uri, "--images",
         images_uri, "-k", "2", "--run-dir", run_uri, "--model", "tiny", "--checkpoint-period", "2",
         "--opts", *slow],
        env=private_cluster.driver_env(address=True), cwd=tmp_path, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    try:
        # Both folds train, one per worker node; wait until both uploaded a checkpoint.
        wait_for(lambda: all(f"runs/node-loss/folds/fold_00{f}/last_checkpoint" in s3.keys("runs/node-loss/")
                             for f in (0, 1)), 600, "both folds' first checkpoint in S3")
        lost = private_cluster.kill_worker(0)  # the node, its disk and its fold are gone
        private_cluster.add_worker()  # a fresh node: nothing of the lost one's disk
        out, _ = driver.communicate(timeout=900)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 0, out[-4000:]
    metrics = json.loads(s3.read("runs/node-loss/metrics.json"))
    retried = [f for f, info in metrics["folds_run"].items() if info["attempts"] > 1]
    assert len(retried) == 1, (lost.name, metrics["folds_run"])
    # One node lost costs one retry (the relaunch waits until Ray has marked the node dead).
    assert metrics["folds_run"][retried[0]]["attempts"] == 2, metrics["folds_run"]
    log = s3.read(f"runs/node-loss/folds/fold_{int(retried[0]):03d}/log.txt").decode()
    assert "attempt 1 on node" in log and "resuming from s3://" in log, log[-3000:]
    resumed_at = [line for line in log.splitlines() if "resumes training at iteration" in line]
    assert resumed_at and int(resumed_at[-1].split("iteration ")[1].split()[0]) >= 2, log[-3000:]


def test_the_driver_killed_and_resumed_from_s3_redoes_no_finished_fold(private_cluster, tmp_path):
    s3 = private_cluster.s3
    control = private_cluster.shared_dir  # test control files only: every node sees them
    ann, images = make_coco(private_cluster.driver_only_dir / "data", n_images=12, categories=2)
    ann_uri, images_uri = upload_dataset(s3, ann.parent)
    run_uri = s3.uri("runs", "driver-kill")
    script = tmp_path / "driver.py"
    script.write_text(
        "import sys\n"
        "from fakes import EchoBackend\n"
        "from kfold_ray import run_cv\n"
        f"run_cv({ann_uri!r}, 3, image_root={images_uri!r}, run_dir={run_uri!r}, gpus_per_fold=0.5,\n"
        "       progress=False, resume='--resume' in sys.argv,\n"
        f"       backend=EchoBackend(control_dir={str(control)!r}, pause_folds=(2,)))\n")
    env = private_cluster.driver_env(address=True)
    first = subprocess.Popen([sys.executable, str(script)], env=env, cwd=tmp_path,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        done = [f"runs/driver-kill/parts/fold_00{f}/DONE.json" for f in (0, 1)]
        wait_for(lambda: set(done) <= set(s3.keys("runs/driver-kill/")), 300, "folds 0 and 1 DONE")
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
    stamps = {k: s3.client().head_object(Bucket=s3.bucket, Key=k)["ETag"] for k in done}
    modified = {k: s3.client().head_object(Bucket=s3.bucket, Key=k)["LastModified"] for k in done}
    (control / "attempts.log").unlink()
    (control / "release").write_text("go")
    time.sleep(1.1)  # S3 LastModified has a resolution of one second
    second = subprocess.run([sys.executable, str(script), "--resume"], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert [line.split()[1] for line in attempts(control)] == ["fold=2"], "only fold 2 runs again"
    for k in done:
        head = s3.client().head_object(Bucket=s3.bucket, Key=k)
        assert (head["ETag"], head["LastModified"]) == (stamps[k], modified[k]), k
    assert json.loads(s3.read("runs/driver-kill/run.json"))["status"] == "finished"


def test_images_only_the_driver_sees_fail_once_naming_node_path_and_fix(private_cluster, tmp_path):
    # The classic mistake: images on the driver's disk, folds on other nodes.
    ann, images = make_coco(private_cluster.driver_only_dir / "data", n_images=6, categories=2,
                            size=(64, 64))
    private_cluster.connect()
    with pytest.raises(FoldFailedError) as info:
        run_cv(ann, 2, image_root=images, model="tiny", overrides=TINY,
               run_dir=private_cluster.s3.uri("runs", "no-images"), progress=False, max_retries=2)
    message = str(info.value)
    assert "ImageReadError: node " in message and str(images) in message, message
    assert "give --images as a URI (s3://, gs://, ...) or mount them at the same path" in message
    assert " after " not in message.split(":")[0], "an unreadable image is not retried: " + message


def test_kfold_ray_run_without_address_joins_the_cluster_started_on_this_node(ray_head, tmp_path):
    ann, images = make_coco(tmp_path / "data", n_images=6, categories=2, size=(64, 64))
    env = ray_head.user_env()
    assert "RAY_ADDRESS" not in env and "RAY_AUTH_MODE" not in env
    done = cli("run", "--annotations", str(ann), "--images", str(images), "-k", "2",
               "--run-dir", str(tmp_path / "run"), "--model", "tiny", "--gpus-per-fold", "0",
               "--opts", *TINY, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    first = next(line for line in done.stderr.splitlines() if line.startswith("[kfold-ray]"))
    port = ray_head.address.rsplit(":", 1)[1]
    assert "(joined)" in first and f":{port}" in first, first
    assert (tmp_path / "run" / "predictions.parquet").is_file()


def test_folds_of_two_workers_on_nodes_that_share_only_s3(private_cluster, tmp_path):
    """Ray Train workers on nodes without the driver's disk: every rank reads the data and the
    checkpoints from S3, rank 0 alone writes the fold's checkpoints and log there."""
    s3 = private_cluster.s3
    ann, _ = make_coco(private_cluster.driver_only_dir / "data", n_images=8, categories=2,
                       size=(64, 64))
    ann_uri, images_uri = upload_dataset(s3, ann.parent)
    run_uri = s3.uri("runs", "workers")
    done = cli("run", "--annotations", ann_uri, "--images", images_uri, "-k", "2",
               "--run-dir", run_uri, "--model", "tiny", "--gpus-per-fold", "0",
               "--workers-per-fold", "2", "--checkpoint-period", "3", "--opts", *TINY,
               env=private_cluster.driver_env(address=True), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 folds x 2 CPUs each (2 workers)" in done.stderr, done.stderr[-2000:]
    metrics = json.loads(s3.read("runs/workers/metrics.json"))
    for fold, info in metrics["folds_run"].items():
        assert info["workers"] == 2 and info["weights"][0] == info["weights"][1], (fold, info)
    keys = set(s3.keys("runs/workers/"))
    for fold in (0, 1):
        assert f"runs/workers/folds/fold_00{fold}/model_final.pth" in keys, sorted(keys)
        log = s3.read(f"runs/workers/folds/fold_00{fold}/log.txt").decode()
        assert "(worker 0 of 2)" in log and "(worker 1 of 2)" not in log, log[-2000:]
