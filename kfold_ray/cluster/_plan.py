"""Sizing the fold actors to the cluster: each fold's GPUs, CPUs and workers, and how the folds
map onto the cluster in waves (with a warning when a wave leaves GPUs idle)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .._config import CVConfig
from .._exceptions import ConfigError
from ._connect import ClusterInfo


@dataclass(frozen=True, kw_only=True)
class FoldLaunch:
    """How folds are placed on the cluster: each takes ``num_gpus`` and ``num_cpus`` in all,
    split evenly over its ``workers`` processes (one fold actor when 1; Ray Train workers else)."""

    num_gpus: float
    num_cpus: float
    workers: int = 1
    across_nodes: bool = False  # a multi-GPU fold's workers may spread over nodes

    @property
    def gpus_per_worker(self) -> float:
        return self.num_gpus / self.workers

    @property
    def cpus_per_worker(self) -> float:
        return self.num_cpus / self.workers



def plan_launch(info: ClusterInfo, config: CVConfig, *, folds: int) -> tuple[FoldLaunch, list[str]]:
    """The folds' resources, and the lines that tell the user how folds map onto the cluster.

    GPUs: ``gpus_per_fold``, except on a local cluster started here without GPUs, where folds
    train on CPU rather than wait forever. CPUs: ``cpus_per_fold``, or by default the fold's share
    of the CPUs per GPU of the nodes that can host it (48 CPUs / 4 GPUs -> 12 for a one-GPU fold):
    the GPU nodes alive now and the GPU node types the autoscaler can launch, the smallest ratio
    among them, so that a fold fits on each; 1 per worker without GPUs. Workers:
    ``workers_per_fold`` (default: the whole GPUs of a fold, else 1); a multi-GPU fold's workers
    stay on one node, so only node types with that many GPUs host it.
    """
    lines = [info.describe()]
    gpus = config.gpus_per_fold
    if gpus and not info.gpus:
        if info.started_here:
            lines.append("no GPU on this local Ray cluster: folds train on CPU")
            gpus = 0
        elif info.node_types:
            lines.append("no GPU node is up yet: folds wait while the autoscaler launches them")
        else:
            lines.append("warning: the Ray cluster has no GPU now: folds wait for GPU workers "
                         "(autoscaler); pass --gpus-per-fold 0 on a CPU-only cluster")
    workers = config.workers
    cpus = config.cpus_per_fold
    if cpus is None:
        cpus, sized = _default_cpus(info, gpus, 1 if config.workers_across_nodes else workers)
        lines.extend(sized)
    launch = FoldLaunch(num_gpus=gpus, num_cpus=cpus, workers=workers,
                        across_nodes=config.workers_across_nodes)
    lines.extend(_waves(folds, launch, info))
    return launch, lines


def _default_cpus(info: ClusterInfo, gpus: float, workers: int) -> tuple[float, list[str]]:
    """A fold's CPUs when the user gave none, and a line saying what they were sized for.
    ``workers``: the fold's processes that must share one node."""
    if not gpus:
        return 1.0 * workers, []
    # GPUs one node must have: a fraction needs one; N workers on one node need N.
    need = max(1.0, gpus if workers > 1 else 1.0)
    alive = [(c, g) for c, g in info.gpu_nodes if g >= need - 1e-9]
    if not info.gpu_nodes and info.cpus_per_gpu and info.gpus >= need:
        alive = [(info.cpus_per_gpu, 1.0)]  # a ClusterInfo that knows the ratio only
    hosts = [t for t in info.node_types if t.gpus >= need - 1e-9]
    if info.node_types and not hosts and not alive:
        raise ConfigError(
            f"no GPU node type of this cluster's autoscaler has {need:g} GPUs for one fold "
            f"({', '.join(t.describe() for t in info.node_types)}): lower --gpus-per-fold, or add "
            "a node type with that many GPUs to the cluster config")
    ratios = [c / g for c, g in alive] + [t.cpus / t.gpus for t in hosts]
    if not ratios:
        return 1.0, ["warning: no GPU node to size the folds' CPUs by: 1 CPU per fold (pass "
                     "--cpus-per-fold for the data loader's workers)"]
    cpus = max(1.0, math.floor(min(ratios) * gpus + 1e-9))
    if not hosts:
        return cpus, []
    return cpus, [f"CPUs per fold sized for the GPU node types the autoscaler can launch, "
                  f"{', '.join(t.describe() for t in hosts)}: {min(ratios):g} CPUs per GPU, so "
                  f"a fold fits on {'each' if len(hosts) + len(alive) > 1 else 'it'}"]


def _waves(folds: int, launch: FoldLaunch, info: ClusterInfo) -> list[str]:
    """'5 folds x 2 GPUs + 24 CPUs each (2 workers) on 8 GPUs: 2 waves', and a warning when a
    wave leaves GPUs idle (a fold's GPUs do not divide the cluster's, or the last wave is short)."""
    gpus, cpus = launch.num_gpus, launch.num_cpus
    if gpus:
        fit = int(info.gpus // gpus + 1e-9)
        unit = f"{gpus:g} GPU{'s' * (gpus != 1)} + {cpus:g} CPUs"
        total = f"{info.gpus:g} GPUs"
    else:
        fit = int(info.cpus // cpus + 1e-9)
        unit, total = f"{cpus:g} CPU{'s' * (cpus != 1)}", f"{info.cpus:g} CPUs"
    each = f"each ({launch.workers} workers)" if launch.workers > 1 else "each"
    if fit < 1:
        return [f"{folds} folds x {unit} {each}; the cluster has {total} now: folds wait for more nodes"]
    waves = math.ceil(folds / fit)
    lines = [f"{folds} folds x {unit} {each} on {total}: {waves} wave{'s' * (waves != 1)}"]
    if gpus:
        busy = min(fit, folds) * gpus
        if info.gpus - busy >= 1 - 1e-9:
            lines.append(f"warning: {info.gpus - busy:g} of {info.gpus:g} GPUs stay idle while the "
                         f"{'first wave runs' if waves > 1 else 'folds run'}")
        last = folds - fit * (waves - 1)
        if waves > 1 and last < fit:
            idle = info.gpus - last * gpus
            lines.append(f"warning: the last wave runs {last} fold{'s' * (last != 1)}: "
                         f"{idle:g} of {info.gpus:g} GPUs idle then")
    return lines
