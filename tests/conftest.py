"""Shared fixtures: real Ray clusters (local, fake GPUs, multi-node) and small COCO datasets."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
# The fake-GPU permit (tests/permit/sitecustomize.py): with it, a fold that reserved one of the
# fake GPUs these tests give Ray trains on the CPU; without it, the product stops such a fold.
PERMIT_DIR = TESTS_DIR / "permit"
sys.path.insert(0, str(TESTS_DIR))
# Ray workers must be able to import test-only backends (tests/fakes.py) by reference, and start
# with the permit: they inherit the driver's environment (ray.init's local cluster, the `ray start`
# nodes of tests/clusters.py, the fake autoscaler's nodes).
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(TESTS_DIR), str(PERMIT_DIR), os.environ.get("PYTHONPATH", "")) if p
)


def _install_permit_here() -> None:
    """The permit in this process too (pytest started before PYTHONPATH had it)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("kfold_ray_test_permit", PERMIT_DIR / "sitecustomize.py")
    spec.loader.exec_module(importlib.util.module_from_spec(spec))


_install_permit_here()
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


from clusters import init_local_ray as _init  # noqa: E402  (tests/ is on sys.path from here on)


@pytest.fixture(autouse=True)
def _no_ray_left_connected():
    """A test that ran the CLI in-process (`kfold_ray._cli.main`) leaves this process connected to
    the Ray it started, as the command would until its process exits: disconnect after every test,
    so that the next one's fixtures start their own cluster."""
    yield
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


@pytest.fixture
def ray_local():
    """A fresh local Ray with 2 CPUs (this machine's size) and no GPU."""
    ray = _init(num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture
def ray_fake_gpus():
    """Local Ray that advertises 2 GPUs: scheduling is real, the GPUs are not (tests run on CPU)."""
    ray = _init(num_cpus=4, num_gpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture
def ray_cluster():
    """A 3-node Ray cluster on this machine (head without GPUs, two workers with fake GPUs)."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0})
    workers = [cluster.add_node(num_cpus=2, num_gpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    ray = _init(address=cluster.address)
    yield cluster, workers
    ray.shutdown()
    cluster.shutdown()


# ------------------------------------------------------------------------------------------------
# Clusters whose nodes share nothing but the network and S3 (tests/clusters.py).


@pytest.fixture(scope="session")
def s3_server():
    """One moto S3 server for the whole session (127.0.0.1, a free port); see `s3`."""
    from clusters import S3Server

    server = S3Server().start()
    yield server
    server.close()


@pytest.fixture
def s3(s3_server, monkeypatch):
    """A fresh bucket on the session's moto S3 server (`clusters.S3Bucket`: .bucket, .uri(*parts)
    -> "s3://<bucket>/<parts>", .new_bucket() -> "s3://<another new bucket>", .env, .endpoint,
    .server, .client() (boto3), .keys(prefix), .read(key), .write(key, data)).

    While the test runs, this process has the server's AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID /
    AWS_SECRET_ACCESS_KEY (testing), AWS_DEFAULT_REGION / AWS_REGION (us-east-1) and
    AWS_EC2_METADATA_DISABLED=true in os.environ, and none of AWS_PROFILE, AWS_SESSION_TOKEN,
    AWS_ENDPOINT_URL_S3 & co. (all restored afterwards), so plain
    ``pyarrow.fs.FileSystem.from_uri("s3://...")`` reaches it."""
    from clusters import AWS_CONFLICTING_VARS, S3Bucket

    for key in AWS_CONFLICTING_VARS:
        monkeypatch.delenv(key, raising=False)
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    return S3Bucket(s3_server, s3_server.create_bucket())


@pytest.fixture
def private_cluster(s3, tmp_path):
    """A Ray cluster of ``ray start`` nodes that share nothing but the network and S3.

    Head: 1 CPU, no GPU. Two worker nodes: 2 CPUs, 1 fake GPU, resource ``{"node_a": 1}`` /
    ``{"node_b": 1}``, each in a private mount namespace where ``driver_only_dir`` is an empty
    tmpfs. Every node has the `s3` bucket's AWS variables, tests/ on PYTHONPATH and
    RAY_AUTH_MODE=disabled (like this process, see above). Needs root (else skipped).

    Gives a `clusters.PrivateCluster`: .address ("127.0.0.1:<port>"), .head and .workers /
    .alive_workers (`clusters.RayNode`: .name, .node_id, .resources, .startup_s, .pids(),
    .ray_logs), .kill_worker(i) (SIGKILL every process of that node at once; returns once Ray
    marks it dead, ~15 s), .add_worker(resources=None) (a private one more; node_c, node_d, ...),
    .driver_only_dir (the driver and the head see its files, worker nodes an empty folder),
    .shared_dir (every node sees it: test control files only), .s3 (the `s3` bucket),
    .connect() (ray.init this process; disconnected again at teardown), .driver_env() (for a
    driver subprocess: S3 variables, RAY_AUTH_MODE=disabled, RAY_TMPDIR so that Ray's own
    lookup finds this cluster; address=True adds RAY_ADDRESS), .cluster (the `RayCluster`).
    The fixture itself does not connect this process."""
    from clusters import PrivateCluster, RayCluster, private_mounts_unavailable

    reason = private_mounts_unavailable()
    if reason:
        pytest.skip(reason)
    driver_only, shared = tmp_path / "driver_only", tmp_path / "shared"
    driver_only.mkdir()
    shared.mkdir()
    cluster = RayCluster(head_cpus=1, head_gpus=0, env=s3.env)
    try:
        cluster.start()
        pc = PrivateCluster(cluster, driver_only_dir=driver_only, shared_dir=shared, s3=s3)
        pc.add_worker(wait=False)  # both start at once, then one wait
        pc.add_worker(wait=False)
        pc.wait_for_workers()
        yield pc
    finally:
        cluster.shutdown()


@pytest.fixture
def ray_head(tmp_path_factory):
    """A plain ``ray start --head`` (2 CPUs, no GPU) with Ray's defaults: RAY_AUTH_MODE unset in
    its environment, on a machine where a token exists (a HOME of its own, like the user's but
    with a fresh ~/.ray/auth_token), so ``ray start`` turns token auth on -- the trap a driver
    joining it must handle: with RAY_AUTH_MODE unset, ``ray.init()`` that finds the cluster
    itself turns token auth on and joins, but ``ray.init(address=...)`` / RAY_ADDRESS fails
    after ~20 s with a bare ConnectionError (test_cluster_fixtures.py).

    Gives a `clusters.RayCluster`: .address, .home, .token (the token text), .user_env() (the
    environment of a user's shell on that node: that HOME, PYTHONPATH, RAY_TMPDIR so that Ray's
    lookup of "the cluster running on this node" finds this one and no other; no RAY_ADDRESS,
    no RAY_AUTH_MODE). Its `connect()` does not work from this process (RAY_AUTH_MODE=disabled
    here): drive it from a subprocess with `user_env()`."""
    from clusters import RayCluster, make_token_home

    home = make_token_home(tmp_path_factory.mktemp("home"))
    cluster = RayCluster(head_cpus=2, head_gpus=0, auth_mode=None, home=home)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.shutdown()
