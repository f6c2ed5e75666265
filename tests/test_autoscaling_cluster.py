"""The README's cluster workflow on an autoscaling cluster: a CPU-only head, cluster.yaml's GPU
worker types at 0 nodes, the data and the run dir on S3, the run submitted with ``ray job
submit``. The autoscaler must launch GPU nodes for the folds, the folds must get the CPUs the
node types allow (not the 1 CPU a plan from the nodes alive at launch gives), the job must
finish, and ``ray job logs`` must show the progress lines.

Ray's fake multi-node provider stands in for EC2 (tests/clusters.py, FakeAutoscalingCluster):
each node it launches is a real Ray node on this machine with the node type's logical
resources.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import pytest
import yaml
from clusters import FakeAutoscalingCluster
from cocofactory import make_coco, upload_tree

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def autoscaling_cluster(s3):
    types = yaml.safe_load((ROOT / "cluster.yaml").read_text())["available_node_types"]
    workers = {name: {"resources": spec["resources"], "max_workers": spec["max_workers"]}
               for name, spec in types.items() if name.startswith("ray.worker.")}
    cluster = FakeAutoscalingCluster(workers, head_cpus=2, env=s3.env)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.shutdown()


def test_ray_job_submit_on_an_autoscaling_cluster_with_s3(autoscaling_cluster, s3, tmp_path):
    cluster = autoscaling_cluster
    make_coco(tmp_path / "data", n_images=8)
    data = upload_tree(tmp_path / "data", s3.uri("data"))
    run_dir = s3.uri("runs", "run1")
    kfold_ray = str(Path(sys.executable).with_name("kfold-ray"))
    # Before the run: no GPU node is up, and the doctor says what the autoscaler can launch.
    import subprocess

    doctor = subprocess.run([kfold_ray, "doctor", "--address", cluster.address, "--storage", run_dir],
                            env=cluster.driver_env(), capture_output=True, text=True, timeout=300)
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    assert ("no GPU node is up; the autoscaler can launch: ray.worker.gpu (4 CPUs, 1 GPU) x4, "
            "ray.worker.gpu4 (48 CPUs, 4 GPUs) x1") in doctor.stdout
    assert "storage ok" in doctor.stdout
    submitted = cluster.ray(
        "job", "submit", "--address", cluster.dashboard_url, "--no-wait", "--",
        kfold_ray, "run", "--annotations", f"{data}/annotations.json", "--images", f"{data}/images",
        "--run-dir", run_dir, "-k", "2", "--model", "tiny", "--gpus-per-fold", "1",
        "--opts", "SOLVER.MAX_ITER", "3", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "2")
    assert submitted.returncode == 0, submitted.stderr
    job = re.search(r"raysubmit_\w+", submitted.stdout + submitted.stderr).group(0)
    status = _wait_for_job(cluster, job, timeout_s=900)
    logs = cluster.ray("job", "logs", "--address", cluster.dashboard_url, job).stdout
    assert status == "SUCCEEDED", logs[-4000:]
    # Planned from the node types the autoscaler can launch, while no GPU node was up:
    assert "no GPU node is up yet: folds wait while the autoscaler launches them" in logs
    assert ("CPUs per fold sized for the GPU node types the autoscaler can launch, ray.worker.gpu "
            "(4 CPUs, 1 GPU), ray.worker.gpu4 (48 CPUs, 4 GPUs): 4 CPUs per GPU") in logs
    # The progress lines of the folds, and the end.
    assert re.search(r"\[kfold-ray\] fold \d: (train|predict|done)", logs), logs[-4000:]
    assert "done: out-of-fold predictions for 8 images" in logs
    metrics = json.loads(s3.read("runs/run1/metrics.json"))
    assert metrics["launch"]["cpus_per_fold"] == 4
    assert metrics["launch"]["gpus_per_fold"] == 1
    head_ip = "127.0.0.1"
    nodes = {n for f in metrics["folds_run"].values() for n in f["nodes"]}
    assert nodes and all(head_ip not in n for n in nodes)
    ran_with = json.loads(s3.read("runs/run1/folds/fold_000/ran_with.json"))
    assert ran_with["gpus"] == 1  # a fake GPU: the tests' permit trains it on the CPU


def _wait_for_job(cluster: FakeAutoscalingCluster, job: str, timeout_s: float) -> str:
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(cluster.dashboard_url)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = client.get_job_status(job)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            return status.value
        time.sleep(3)
    return "TIMEOUT"
