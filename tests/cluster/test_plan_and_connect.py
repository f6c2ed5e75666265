"""Joining the Ray cluster and sizing fold actors to it (kfold_ray.cluster)."""

from __future__ import annotations

import pytest

from kfold_ray.cluster._connect import ClusterInfo
from kfold_ray.cluster._plan import plan_launch
from kfold_ray._config import CVConfig
from kfold_ray._exceptions import ConfigError


def _info(*, gpus: float, cpus: float, cpus_per_gpu: float | None, started_here: bool = False):
    return ClusterInfo(address="10.0.0.1:6379", started_here=started_here, nodes=3, cpus=cpus,
                       gpus=gpus, cpus_per_gpu=cpus_per_gpu)


def test_a_one_gpu_fold_gets_its_share_of_the_node_cpus():
    launch, lines = plan_launch(_info(gpus=4, cpus=56, cpus_per_gpu=12), CVConfig(k=5), folds=5)
    assert (launch.num_gpus, launch.num_cpus) == (1.0, 12.0)
    assert lines[0] == "Ray cluster 10.0.0.1:6379 (joined): 3 nodes, 56 CPUs, 4 GPUs"
    assert lines[1] == "5 folds x 1 GPU + 12 CPUs each on 4 GPUs: 2 waves"
    assert lines[2] == "warning: the last wave runs 1 fold: 3 of 4 GPUs idle then"


def test_two_gpu_folds_train_on_two_workers_and_the_plan_says_so():
    launch, lines = plan_launch(_info(gpus=8, cpus=96, cpus_per_gpu=12),
                                CVConfig(k=5, gpus_per_fold=2), folds=5)
    assert (launch.num_gpus, launch.num_cpus, launch.workers) == (2, 24, 2)
    assert (launch.gpus_per_worker, launch.cpus_per_worker) == (1, 12)
    assert lines[1:] == ["5 folds x 2 GPUs + 24 CPUs each (2 workers) on 8 GPUs: 2 waves",
                         "warning: the last wave runs 1 fold: 6 of 8 GPUs idle then"]


def test_folds_whose_gpus_do_not_divide_the_cluster_leave_gpus_idle_in_every_wave():
    _, lines = plan_launch(_info(gpus=8, cpus=96, cpus_per_gpu=12),
                           CVConfig(k=4, gpus_per_fold=3), folds=4)
    assert lines[1] == "4 folds x 3 GPUs + 36 CPUs each (3 workers) on 8 GPUs: 2 waves"
    assert lines[2] == "warning: 2 of 8 GPUs stay idle while the first wave runs"


def test_cpu_workers_get_a_cpu_each():
    launch, lines = plan_launch(_info(gpus=0, cpus=4, cpus_per_gpu=None, started_here=True),
                                CVConfig(k=2, gpus_per_fold=0, workers_per_fold=2), folds=2)
    assert (launch.num_gpus, launch.num_cpus, launch.workers) == (0, 2, 2)
    assert lines[-1] == "2 folds x 2 CPUs each (2 workers) on 4 CPUs: 1 wave"
    launch, _ = plan_launch(_info(gpus=0, cpus=4, cpus_per_gpu=None, started_here=True),
                            CVConfig(k=2, gpus_per_fold=0, workers_per_fold=2, cpus_per_fold=1), folds=2)
    assert launch.cpus_per_worker == 0.5  # Ray shares CPUs in fractions too


@pytest.mark.parametrize("gpus, workers", [(1, 2), (0.5, 2), (4, 2)])
def test_several_workers_take_one_whole_gpu_each(gpus, workers):
    with pytest.raises(ConfigError, match=r"one whole GPU per worker"):
        CVConfig(k=2, gpus_per_fold=gpus, workers_per_fold=workers)


def test_fractional_gpus_keep_one_process_per_fold():
    assert CVConfig(k=2, gpus_per_fold=0.5).workers == 1
    assert CVConfig(k=2, gpus_per_fold=1).workers == 1
    assert CVConfig(k=2, gpus_per_fold=4).workers == 4


def test_half_gpu_folds_pack_two_per_gpu_and_split_its_cpus():
    launch, lines = plan_launch(_info(gpus=2, cpus=16, cpus_per_gpu=8),
                                CVConfig(k=4, gpus_per_fold=0.5), folds=4)
    assert (launch.num_gpus, launch.num_cpus) == (0.5, 4.0)
    assert lines[1] == "4 folds x 0.5 GPUs + 4 CPUs each on 2 GPUs: 1 wave"


def test_the_user_value_wins():
    launch, _ = plan_launch(_info(gpus=4, cpus=56, cpus_per_gpu=12),
                            CVConfig(k=5, cpus_per_fold=3), folds=5)
    assert launch.num_cpus == 3


def test_a_local_cluster_without_gpus_trains_on_cpu():
    launch, lines = plan_launch(_info(gpus=0, cpus=2, cpus_per_gpu=None, started_here=True),
                                CVConfig(k=3), folds=3)
    assert (launch.num_gpus, launch.num_cpus) == (0, 1.0)
    assert "no GPU on this local Ray cluster: folds train on CPU" in lines
    assert lines[-1] == "3 folds x 1 CPU each on 2 CPUs: 2 waves"


def test_a_joined_cluster_without_gpus_waits_and_says_so():
    launch, lines = plan_launch(_info(gpus=0, cpus=8, cpus_per_gpu=None), CVConfig(k=3), folds=3)
    assert launch.num_gpus == 1.0
    assert any("pass --gpus-per-fold 0 on a CPU-only cluster" in line for line in lines)
    assert "folds wait for more nodes" in lines[-1]


def test_address_local_starts_a_cluster_of_our_own():
    import ray

    from kfold_ray.cluster._connect import connect

    assert not ray.is_initialized()
    try:
        info = connect("local")
        assert info.started_here and info.nodes == 1 and info.gpus == 0
    finally:
        ray.shutdown()
