"""``kfold-ray doctor``: every node of a real multi-node cluster, checked where it runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from clusters import RayCluster

pytestmark = pytest.mark.cluster


def _doctor(cluster: RayCluster, *args: str) -> subprocess.CompletedProcess:
    cli = str(Path(sys.executable).with_name("kfold-ray"))
    return subprocess.run([cli, "doctor", "--address", cluster.address, *args],
                          env=cluster.driver_env(), capture_output=True, text=True, timeout=300)


def test_doctor_names_the_gpu_node_cuda_cannot_use_and_checks_the_storage(s3):
    cluster = RayCluster(head_cpus=1, head_gpus=0, env=s3.env)
    try:
        cluster.start()
        cluster.add_worker(num_cpus=2, num_gpus=1)  # a GPU Ray is told about, no driver here
        done = _doctor(cluster, "--storage", s3.uri("runs"))
        assert done.returncode == 1, done.stdout + done.stderr
        lines = done.stdout.splitlines()
        nodes = [line for line in lines if line.startswith("  ")]
        assert len(nodes) == 2, done.stdout
        assert sum("1 GPUs (torch sees 0)" in line for line in nodes) == 1
        assert all("storage ok" in line and "Detectron2 python-only" in line for line in nodes)
        problems = [line for line in lines if line.startswith("problem: ")]
        assert len(problems) == 1 and "Ray offers 1 GPU here, but CUDA is not usable" in problems[0]

        unreachable = _doctor(cluster, "--storage", "s3://no-such-bucket-kfold-ray/runs")
        assert unreachable.returncode == 1
        assert sum("cannot use the storage" in line for line in unreachable.stdout.splitlines()) == 2
    finally:
        cluster.shutdown()


def test_doctor_on_a_cpu_cluster_without_autoscaler_says_what_folds_need():
    cluster = RayCluster(head_cpus=2, head_gpus=0)
    try:
        cluster.start()
        done = _doctor(cluster)
        assert done.returncode == 0, done.stdout + done.stderr
        assert ("no GPU node and no autoscaler that could add one: folds need --gpus-per-fold 0 "
                "here") in done.stdout
    finally:
        cluster.shutdown()
