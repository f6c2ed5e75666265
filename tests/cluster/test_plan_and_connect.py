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


# ---- sizing from the autoscaler's node types (cluster.yaml: GPU types at 0 nodes at launch) ----
def _cluster_yaml_types():
    import yaml
    from pathlib import Path

    from kfold_ray.cluster._autoscaler import node_types_of

    config = yaml.safe_load((Path(__file__).resolve().parents[2] / "cluster.yaml").read_text())
    return node_types_of(config)


def _autoscaled(*, gpu_nodes=(), cpus=8.0):
    return ClusterInfo(address="10.0.0.1:6379", started_here=False, nodes=1 + len(gpu_nodes),
                       cpus=cpus + sum(c for c, _ in gpu_nodes), gpus=sum(g for _, g in gpu_nodes),
                       cpus_per_gpu=min((c / g for c, g in gpu_nodes), default=None),
                       gpu_nodes=tuple(gpu_nodes), node_types=_cluster_yaml_types())


def test_cluster_yaml_s_worker_types_are_read_from_the_file():
    types = {t.name: (t.cpus, t.gpus, t.max_workers) for t in _cluster_yaml_types()}
    assert types == {"ray.worker.gpu": (4, 1, 4), "ray.worker.gpu4": (48, 4, 1)}


def test_with_no_gpu_node_up_folds_are_sized_for_the_types_the_autoscaler_launches():
    launch, lines = plan_launch(_autoscaled(), CVConfig(k=5), folds=5)
    assert (launch.num_gpus, launch.num_cpus) == (1.0, 4.0)  # not 1: the loader gets 3 workers
    assert "no GPU node is up yet: folds wait while the autoscaler launches them" in lines
    assert ("CPUs per fold sized for the GPU node types the autoscaler can launch, ray.worker.gpu "
            "(4 CPUs, 1 GPU), ray.worker.gpu4 (48 CPUs, 4 GPUs): 4 CPUs per GPU, so a fold fits "
            "on each") in lines


def test_a_big_node_up_first_does_not_size_folds_out_of_the_small_nodes():
    launch, _ = plan_launch(_autoscaled(gpu_nodes=[(48.0, 4.0)]), CVConfig(k=5), folds=5)
    assert launch.num_cpus == 4.0  # 12 would never fit a g5.xlarge (4 vCPUs)
    launch, _ = plan_launch(_autoscaled(gpu_nodes=[(48.0, 4.0)]), CVConfig(k=5, gpus_per_fold=0.5),
                            folds=5)
    assert launch.num_cpus == 2.0


def test_a_multi_gpu_fold_fits_only_the_multi_gpu_type_unless_its_workers_may_spread():
    launch, lines = plan_launch(_autoscaled(), CVConfig(k=2, gpus_per_fold=2), folds=2)
    assert (launch.num_cpus, launch.cpus_per_worker, launch.across_nodes) == (24.0, 12.0, False)
    assert any("ray.worker.gpu4 (48 CPUs, 4 GPUs): 12 CPUs per GPU, so a fold fits on it" in line
               for line in lines)
    spread, _ = plan_launch(_autoscaled(), CVConfig(k=2, gpus_per_fold=2, workers_across_nodes=True),
                            folds=2)
    assert (spread.num_cpus, spread.across_nodes) == (8.0, True)


def test_a_fold_no_node_type_can_host_is_refused_up_front():
    with pytest.raises(ConfigError, match=r"no GPU node type of this cluster's autoscaler has 8 GPUs"):
        plan_launch(_autoscaled(), CVConfig(k=2, gpus_per_fold=8), folds=2)
