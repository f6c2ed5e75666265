"""``kfold-ray doctor``: what every node of the cluster has, before a run reserves anything.

For each node alive: its CPUs and the GPUs Ray offers there; torch, its CUDA build, the NVIDIA
driver and whether CUDA works; Detectron2's build (compiled or Python-only); and whether it
reaches the run's storage. A node whose GPUs CUDA cannot use, or that cannot reach the storage,
is a problem (the CLI exits 1). When no GPU node is up, the node types the autoscaler can
launch are listed instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .._node import NodeReport
from ._autoscaler import NodeType, launchable_node_types
from ._connect import ClusterInfo, connect

__all__ = ["Checkup", "NodeCheck", "check_cluster"]


@dataclass(frozen=True)
class NodeCheck:
    """One node: what Ray offers there, what the node has, and what is wrong with it."""

    ray_cpus: float
    ray_gpus: float
    report: NodeReport

    @property
    def problems(self) -> list[str]:
        out = []
        if self.ray_gpus and self.report.cuda_problem:
            out.append(f"Ray offers {self.ray_gpus:g} GPU{'s' * (self.ray_gpus != 1)} here, but "
                       f"{self.report.cuda_problem}")
        if self.report.storage not in (None, "ok"):
            out.append(f"cannot use the storage: {self.report.storage}")
        if self.report.detectron2.startswith("missing"):
            out.append(self.report.detectron2)
        return out

    def describe(self) -> str:
        r = self.report
        gpus = f"{self.ray_gpus:g} GPUs (torch sees {r.gpus_seen_by_torch})" if self.ray_gpus else "no GPU"
        cuda = f"CUDA {r.torch_cuda}" if r.torch_cuda else "CPU-only build"
        storage = "" if r.storage is None else f"; storage {'ok' if r.storage == 'ok' else 'NOT reachable'}"
        return (f"{r.node}: {self.ray_cpus:g} CPUs, {gpus}; torch {r.torch} ({cuda}), NVIDIA "
                f"driver {r.driver or 'none'}; Detectron2 {r.detectron2}{storage}")


@dataclass(frozen=True)
class Checkup:
    cluster: ClusterInfo
    nodes: list[NodeCheck]
    node_types: tuple[NodeType, ...] = field(default=())

    @property
    def problems(self) -> list[str]:
        return [f"{n.report.node}: {p}" for n in self.nodes for p in n.problems]

    def lines(self) -> list[str]:
        out = [self.cluster.describe()]
        out += [f"  {n.describe()}" for n in self.nodes]
        if not any(n.ray_gpus for n in self.nodes):
            if self.node_types:
                out.append("no GPU node is up; the autoscaler can launch: " + ", ".join(
                    f"{t.describe()} x{t.max_workers}" for t in self.node_types))
            else:
                out.append("no GPU node and no autoscaler that could add one: folds need "
                           "--gpus-per-fold 0 here")
        out += [f"problem: {p}" for p in self.problems]
        return out


def check_cluster(address: str | None, storage: str | None = None) -> Checkup:
    """Join the cluster (as a run would) and check every node alive."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from .. import _node

    info = connect(address)
    # Scheduled on each node itself, reserving nothing (a busy node still answers).
    describe = ray.remote(num_cpus=0)(_node.describe_node)
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    refs = [describe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
        n["NodeID"], soft=False)).remote(storage) for n in nodes]
    checks = [NodeCheck(n["Resources"].get("CPU", 0.0), n["Resources"].get("GPU", 0.0), report)
              for n, report in zip(nodes, ray.get(refs))]
    return Checkup(cluster=info, nodes=checks, node_types=launchable_node_types() or ())
