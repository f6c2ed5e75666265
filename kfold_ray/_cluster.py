"""The Ray cluster a run goes on: joining it like Ray does, and sizing the fold actors to it.

``address`` follows ``ray.init``: an explicit address; else ``RAY_ADDRESS`` (set by ``ray job
submit``); else the cluster started with ``ray start`` on this node (``ray exec``, a notebook on
the head); else a new local cluster. ``"local"`` always starts a new local cluster (tests).

A Ray >= 2.5x cluster started with ``ray start`` requires its auth token, and a plain
``ray.init()`` on the same node fails with ``InvalidAuthToken`` unless ``RAY_AUTH_MODE=token``:
when the user has not chosen a mode and a token exists on this machine, we choose token mode.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path


from ._config import CVConfig
from ._exceptions import ConfigError, one_line

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class FoldLaunch:
    """How folds are placed on the cluster: each takes ``num_gpus`` and ``num_cpus`` in all,
    split evenly over its ``workers`` processes (one fold actor when 1; Ray Train workers else)."""

    num_gpus: float
    num_cpus: float
    workers: int = 1

    @property
    def gpus_per_worker(self) -> float:
        return self.num_gpus / self.workers

    @property
    def cpus_per_worker(self) -> float:
        return self.num_cpus / self.workers


@dataclass(frozen=True, kw_only=True)
class ClusterInfo:
    """What the driver found: where it is, and what the cluster offers right now."""

    address: str
    started_here: bool
    nodes: int
    cpus: float
    gpus: float
    cpus_per_gpu: float | None  # on the GPU nodes (the smallest ratio), None without GPUs

    def describe(self) -> str:
        how = "a new local cluster" if self.started_here else "joined"
        return (f"Ray cluster {self.address} ({how}): {self.nodes} node{'s' * (self.nodes != 1)}, "
                f"{self.cpus:g} CPUs, {self.gpus:g} GPUs")


def connect(address: str | None) -> ClusterInfo:
    """Join (or start) the Ray cluster and describe it. ConfigError when it cannot be reached."""
    import ray

    started_here = False
    if not ray.is_initialized():
        target = address or os.environ.get("RAY_ADDRESS") or None
        if target == "local" or (target is None and not _cluster_on_this_node()):
            # A cluster of our own (no address anywhere, nothing running on this node). Ray turns
            # token auth on for it and says so in a banner: not our user's business.
            with _quiet("ray._private.authentication.authentication_token_setup"):
                ray.init(address="local", configure_logging=False, log_to_driver=False)
            started_here = True
        else:
            _use_token_auth_if_available()
            try:
                ray.init(address=target, configure_logging=False, log_to_driver=False)
            except (ConnectionError, ValueError, RuntimeError) as e:
                where = target or "the Ray cluster running on this node"
                raise ConfigError(f"--address {where}: cannot join that Ray cluster "
                                  f"({one_line(e)[:300]}); use --address local for a new local one"
                                  ) from None
    return _describe(started_here)


def _cluster_on_this_node() -> bool:
    """True when a cluster started by ``ray start`` runs on this node (Ray's own lookup: the
    address ``ray start`` left in its temp dir), and its GCS process is still alive (a cluster
    killed without ``ray stop`` leaves the address behind)."""
    try:
        from ray._private.services import canonicalize_bootstrap_address, find_gcs_addresses

        address = canonicalize_bootstrap_address(None)
        if address is None:
            return False
        port = address.rsplit(":", 1)[-1]
        return any(str(a).rsplit(":", 1)[-1] == port for a in find_gcs_addresses())
    except Exception:  # noqa: BLE001 - a private API: if it moved, behave like a fresh machine
        return False


def _use_token_auth_if_available() -> None:
    """Choose ``RAY_AUTH_MODE=token`` when the user has not set a mode and a token exists.

    Ray itself does this only for ``ray.init()`` without an address; an explicit address or
    RAY_ADDRESS would fail with InvalidAuthToken. Ray caches its config at import, so the mode
    is switched the way Ray does it (env + config refresh), not by the env var alone.
    """
    if os.environ.get("RAY_AUTH_MODE"):
        return
    token_file = os.environ.get("RAY_AUTH_TOKEN_PATH") or str(Path.home() / ".ray" / "auth_token")
    if not (os.environ.get("RAY_AUTH_TOKEN") or Path(token_file).is_file()):
        return
    try:
        from ray._private.authentication import authentication_token_setup as auth

        with _quiet(auth.__name__):
            auth._enable_token_auth()
    except (ImportError, AttributeError):  # another Ray: the variable is all there is
        os.environ["RAY_AUTH_MODE"] = "token"


@contextlib.contextmanager
def _quiet(logger_name: str):
    """Only errors from this logger for the duration."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _describe(started_here: bool) -> ClusterInfo:
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    ratios = [n["Resources"].get("CPU", 0) / n["Resources"]["GPU"]
              for n in nodes if n["Resources"].get("GPU")]
    resources = ray.cluster_resources()
    try:
        address = ray.get_runtime_context().gcs_address
    except Exception:  # noqa: BLE001 - only for the message
        address = "?"
    return ClusterInfo(address=address, started_here=started_here, nodes=len(nodes),
                       cpus=resources.get("CPU", 0.0), gpus=resources.get("GPU", 0.0),
                       cpus_per_gpu=min(ratios) if ratios else None)


def plan_launch(info: ClusterInfo, config: CVConfig, *, folds: int) -> tuple[FoldLaunch, list[str]]:
    """The folds' resources, and the lines that tell the user how folds map onto the cluster.

    GPUs: ``gpus_per_fold``, except on a local cluster started here without GPUs, where folds
    train on CPU rather than wait forever. CPUs: ``cpus_per_fold``, or by default the fold's share
    of its node's CPUs per GPU (48 CPUs / 4 GPUs -> 12 for a one-GPU fold), 1 per worker without
    GPUs. Workers: ``workers_per_fold`` (default: the whole GPUs of a fold, else 1).
    """
    lines = [info.describe()]
    gpus = config.gpus_per_fold
    if gpus and not info.gpus:
        if info.started_here:
            lines.append("no GPU on this local Ray cluster: folds train on CPU")
            gpus = 0
        else:
            lines.append("warning: the Ray cluster has no GPU now: folds wait for GPU workers "
                         "(autoscaler); pass --gpus-per-fold 0 on a CPU-only cluster")
    workers = config.workers
    cpus = config.cpus_per_fold
    if cpus is None:
        cpus = (max(1.0, math.floor(info.cpus_per_gpu * gpus)) if gpus and info.cpus_per_gpu
                else 1.0) * (1 if gpus else workers)
    launch = FoldLaunch(num_gpus=gpus, num_cpus=cpus, workers=workers)
    lines.extend(_waves(folds, launch, info))
    return launch, lines


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
