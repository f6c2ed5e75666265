"""What the cluster's autoscaler can add: its node types, and the nodes it is launching now.

A cluster started by ``ray up cluster.yaml`` has no GPU node when the driver starts (every GPU
type has ``min_workers: 0``), so sizing folds from the nodes alive then would give each fold one
CPU. The node types come from the autoscaler's own config: the cluster config Ray's GCS holds
(autoscaler v2, KubeRay), else the ``--autoscaling-config`` file of the autoscaler (``ray
start --head --autoscaling-config=...``, ``ray up``'s ``~/ray_bootstrap_config.yaml``) running on
this node, where a ``ray exec`` or ``ray job submit`` driver runs. None when neither can be read
(a cluster without an autoscaler, or a driver elsewhere).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass

log = logging.getLogger(__name__)

__all__ = ["NodeType", "launchable_node_types", "launching_now"]


@dataclass(frozen=True)
class NodeType:
    """A worker node type the autoscaler can launch: its logical CPUs and GPUs, and how many."""

    name: str
    cpus: float
    gpus: float
    max_workers: int

    def describe(self) -> str:
        return f"{self.name} ({self.cpus:g} CPUs, {self.gpus:g} GPU{'s' * (self.gpus != 1)})"


def launchable_node_types() -> tuple[NodeType, ...] | None:
    """The worker node types the cluster's autoscaler can launch (``max_workers`` > 0), or None
    when no autoscaler config can be read from here."""
    types = _from_gcs()
    if types is None:
        types = _from_autoscaler_config_file()
    return types


def _from_gcs() -> tuple[NodeType, ...] | None:
    try:
        import ray._private.state as state

        config = state.state.get_cluster_config()
    except Exception:  # noqa: BLE001 - a private API: if it moved, try the file
        return None
    if not config or not config.node_group_configs:
        return None
    return tuple(NodeType(g.name, float(g.resources.get("CPU", 0)), float(g.resources.get("GPU", 0)),
                          int(g.max_count) if g.max_count >= 0 else 1 << 30)
                 for g in config.node_group_configs if g.max_count != 0 and g.resources)


def _from_autoscaler_config_file() -> tuple[NodeType, ...] | None:
    path = _autoscaler_config_path()
    if path is None:
        return None
    try:
        import yaml

        with open(path, encoding="utf-8") as f:
            config = yaml.safe_load(f)
        return node_types_of(config)
    except (OSError, ValueError, TypeError, AttributeError) as e:
        log.warning("cannot read the autoscaler's config %s (%s): folds are sized from the "
                    "nodes alive now", path, e)
        return None
    except Exception as e:  # noqa: BLE001 - yaml's errors
        log.warning("cannot parse the autoscaler's config %s (%s)", path, e)
        return None


def node_types_of(config: dict) -> tuple[NodeType, ...]:
    """Worker node types of a Ray cluster config (``available_node_types``, without the head's
    and without types that may launch no node)."""
    head = config.get("head_node_type")
    types = []
    for name, spec in (config.get("available_node_types") or {}).items():
        resources = spec.get("resources") or {}
        most = int(spec.get("max_workers", config.get("max_workers", 2)))
        if name == head or most <= 0:
            continue
        types.append(NodeType(name, float(resources.get("CPU", 0)), float(resources.get("GPU", 0)),
                              most))
    return tuple(types)


def _autoscaler_config_path() -> str | None:
    """The ``--autoscaling-config`` of this cluster's autoscaler (Ray's monitor), when it runs
    on this node (the monitor of another cluster on the same machine does not count)."""
    try:
        import psutil
        import ray

        gcs = ray.get_runtime_context().gcs_address
    except Exception:  # noqa: BLE001 - not connected: no cluster to ask about
        return None
    port = gcs.rsplit(":", 1)[-1]
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info.get("cmdline") or []
        if not any(part.endswith("monitor.py") for part in cmdline):
            continue
        if not any(part.startswith("--gcs-address=") and part.rsplit(":", 1)[-1] == port
                   for part in cmdline):
            continue
        for i, part in enumerate(cmdline):
            value = None
            if part.startswith("--autoscaling-config="):
                value = part.split("=", 1)[1]
            elif part == "--autoscaling-config" and i + 1 < len(cmdline):
                value = cmdline[i + 1]
            if value:
                value = os.path.expanduser(value)
                if not os.path.isabs(value):
                    try:
                        value = os.path.join(proc.cwd(), value)
                    except Exception:  # noqa: BLE001 - psutil.AccessDenied & co.
                        continue
                return value if os.path.isfile(value) else None
    return None


def launching_now() -> str | None:
    """``"the autoscaler is launching 2 x ray.worker.gpu"`` while it adds nodes, else None."""
    try:
        from ray.experimental.internal_kv import _internal_kv_get

        raw = _internal_kv_get(b"__autoscaling_status")
    except Exception:  # noqa: BLE001 - no autoscaler, or a private API that moved
        return None
    if not raw:
        return None
    try:
        report = json.loads(raw).get("autoscaler_report") or {}
    except ValueError:
        return None
    launching = dict(report.get("pending_launches") or {})
    for node in report.get("pending_nodes") or []:
        # [ip, node type, status] in Ray 2.x's report
        kind = node[1] if isinstance(node, (list, tuple)) and len(node) > 1 else "node"
        launching[kind] = launching.get(kind, 0) + 1
    if not launching:
        return None
    return "the autoscaler is launching " + ", ".join(
        f"{n} x {kind}" for kind, n in sorted(launching.items()))
