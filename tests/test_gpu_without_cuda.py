"""A fold that reserved a GPU its process cannot use stops at once, on one line, and is not
retried: it never trains on the CPU for days (a node whose NVIDIA driver is too old for torch's
CUDA build, a CPU-only torch, a GPU Ray was told about that is not there).

On this CPU machine a ``ray start --num-gpus 1`` node is exactly that node. Its processes start
without the tests' fake-GPU permit (tests/permit/), so they meet the product's real check.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from clusters import RayCluster
from cocofactory import make_coco

pytestmark = pytest.mark.cluster


@pytest.fixture
def gpu_node_without_cuda():
    cluster = RayCluster(head_cpus=2, head_gpus=1, fake_gpu_permit=False)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.shutdown()


def test_the_cli_stops_a_fold_on_a_gpu_it_cannot_use(gpu_node_without_cuda, tmp_path):
    cluster = gpu_node_without_cuda
    ann, images = make_coco(tmp_path / "data", n_images=6)
    run_dir = tmp_path / "run"
    done = subprocess.run(
        [_cli(), "run", "--annotations", str(ann), "--images", str(images), "-k", "2",
         "--model", "tiny", "--opts", "SOLVER.MAX_ITER", "20", "--gpus-per-fold", "0.5",
         "--run-dir", str(run_dir), "--address", cluster.address, "--quiet"],
        env=cluster.driver_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 1, done.stderr[-3000:]
    failed = [line for line in done.stderr.splitlines() if line.startswith("kfold-ray: failed:")]
    assert len(failed) == 1, done.stderr[-3000:]
    line = failed[0]
    for fold in (0, 1):
        # One attempt each: "fold N failed: ..." (a retried fold says "after N attempts").
        assert f"fold {fold} failed: NodeSetupError: node " in line
    assert "after" not in line.split("NodeSetupError")[0]
    assert "a fold reserved 0.5 GPU here, but CUDA is not usable" in line
    assert "torch 2." in line and "built for CUDA" in line  # what torch was built for
    assert "NVIDIA driver" in line  # what the node has (here: none)
    assert "--gpus-per-fold 0" in line  # and the fix
    # Nothing trained: the check comes before any iteration or checkpoint.
    assert not list(run_dir.rglob("*.pth"))
    assert not list((run_dir / "parts").rglob("*.arrow"))


def _cli() -> str:
    """The environment's own ``kfold-ray`` (beside this interpreter)."""
    return str(Path(sys.executable).parent / "kfold-ray")
