"""The Ray cluster a run goes on: joining it like Ray does, and what it offers.

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
import os
from dataclasses import dataclass
from pathlib import Path

from .._exceptions import ConfigError, one_line
from ._autoscaler import NodeType, launchable_node_types

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class ClusterInfo:
    """What the driver found: where it is, and what the cluster offers right now."""

    address: str
    started_here: bool
    nodes: int
    cpus: float
    gpus: float
    cpus_per_gpu: float | None  # on the GPU nodes (the smallest ratio), None without GPUs
    gpu_nodes: tuple[tuple[float, float], ...] = ()  # (CPUs, GPUs) of each GPU node alive now
    node_types: tuple[NodeType, ...] = ()  # what the autoscaler can launch (empty: none known)
    dashboard_url: str | None = None  # http://host:port of the Ray dashboard, None without one
    token_auth: bool = False  # the cluster (and so its dashboard) asks for its auth token

    def describe(self) -> str:
        how = "a new local cluster" if self.started_here else "joined"
        return (f"Ray cluster {self.address} ({how}): {self.nodes} node{'s' * (self.nodes != 1)}, "
                f"{self.cpus:g} CPUs, {self.gpus:g} GPUs")

    def dashboard(self) -> str | None:
        """The line that says where the Ray dashboard is (and how to get past its token page)."""
        if not self.dashboard_url:
            return None
        token = ("; it asks for the cluster's auth token: `ray get-auth-token` prints it"
                 if self.token_auth else "")
        return f"Ray dashboard: {self.dashboard_url} (Actors: one per fold; Metrics){token}"


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
        from ray._private.services import (
            canonicalize_bootstrap_address,
            find_gcs_addresses,
        )

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
    gpu_nodes = tuple((n["Resources"].get("CPU", 0.0), n["Resources"]["GPU"])
                      for n in nodes if n["Resources"].get("GPU"))
    return ClusterInfo(address=address, started_here=started_here, nodes=len(nodes),
                       cpus=resources.get("CPU", 0.0), gpus=resources.get("GPU", 0.0),
                       cpus_per_gpu=min(ratios) if ratios else None, gpu_nodes=gpu_nodes,
                       node_types=() if started_here else (launchable_node_types() or ()),
                       dashboard_url=_dashboard_url(), token_auth=_token_auth())


def _dashboard_url() -> str | None:
    try:
        from ray._private.worker import get_dashboard_url

        url = get_dashboard_url()
    except Exception:  # noqa: BLE001 - a private API: only for a message
        return None
    return f"http://{url}" if url else None


def _token_auth() -> bool:
    try:
        from ray._private.authentication.authentication_utils import is_token_auth_enabled

        return bool(is_token_auth_enabled())
    except Exception:  # noqa: BLE001 - a private API (Ray before 2.5x: no tokens)
        return False
