"""The cluster fixtures do what they say: worker nodes see no file of the driver's, reach the same
S3, can be lost and replaced; a default `ray start --head` wants its auth token."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.cluster


def _remote_look():
    import ray

    @ray.remote(num_cpus=1)
    def look(hidden: str, shared: str, write_here: str):
        import os

        import ray

        with open(write_here, "w") as f:  # lands in this node's own tmpfs
            f.write("written on a worker node")
        return {
            "node_id": ray.get_runtime_context().get_node_id(),
            "hidden_exists": os.path.exists(hidden),
            "listing": sorted(os.listdir(os.path.dirname(write_here))),
            "shared": open(shared).read() if os.path.exists(shared) else None,
        }

    return look


def _alive_node_ids(ray) -> set[str]:
    return {n["NodeID"] for n in ray.nodes() if n["Alive"]}


def _wait_for(cond, what: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.25)


def test_driver_only_dir_is_invisible_to_every_worker_node(private_cluster):
    secret = private_cluster.driver_only_dir / "images" / "secret.txt"
    secret.parent.mkdir()
    secret.write_text("driver only")
    control = private_cluster.shared_dir / "control.txt"
    control.write_text("seen by all")
    ray = private_cluster.connect()
    look = _remote_look()

    assert len(private_cluster.workers) == 2
    for i, worker in enumerate(private_cluster.workers):
        (resource,) = worker.resources
        written = private_cluster.driver_only_dir / f"from_{worker.name}.txt"
        got = ray.get(look.options(resources={resource: 1}).remote(
            str(secret), str(control), str(written)), timeout=120)
        assert got["node_id"] == worker.node_id, "the task ran on the node that has the resource"
        assert got["hidden_exists"] is False, f"{worker.name} sees the driver's file"
        assert got["listing"] == [written.name], "a worker sees only what it wrote itself"
        assert got["shared"] == "seen by all"
        assert not written.exists(), "what a worker writes there never reaches the driver"
    assert secret.read_text() == "driver only"
    assert sorted(p.name for p in private_cluster.driver_only_dir.iterdir()) == ["images"]

    # The head node (the driver's machine) sees the real folder.
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    on_head = look.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
        private_cluster.head.node_id, soft=False))
    written = private_cluster.driver_only_dir / "from_head.txt"
    got = ray.get(on_head.remote(str(secret), str(control), str(written)), timeout=120)
    assert got["node_id"] == private_cluster.head.node_id
    assert got["hidden_exists"] is True
    assert written.read_text() == "written on a worker node"


def test_worker_nodes_share_the_s3_bucket_with_the_driver(private_cluster):
    import pyarrow.fs as pafs

    s3 = private_cluster.s3
    assert os.environ["AWS_ENDPOINT_URL"] == s3.endpoint, "the `s3` fixture sets this process's env"
    fs, path = pafs.FileSystem.from_uri(s3.uri("in", "from-driver.txt"))
    with fs.open_output_stream(path) as f:
        f.write(b"hello from the driver")
    ray = private_cluster.connect()

    @ray.remote(num_cpus=1)
    def roundtrip(src: str, dst: str):
        import os

        import pyarrow.fs as pafs

        import ray

        fs, path = pafs.FileSystem.from_uri(src)
        with fs.open_input_stream(path) as f:
            data = f.read()
        fs, path = pafs.FileSystem.from_uri(dst)
        with fs.open_output_stream(path) as f:
            f.write(data + b" via " + ray.get_runtime_context().get_node_id().encode())
        return os.environ.get("AWS_ENDPOINT_URL"), data

    for worker in private_cluster.workers:
        (resource,) = worker.resources
        dst = s3.uri("out", f"{worker.name}.txt")
        endpoint, data = ray.get(roundtrip.options(resources={resource: 1}).remote(
            s3.uri("in", "from-driver.txt"), dst), timeout=120)
        assert endpoint == s3.endpoint, "the node's own environment points at moto"
        assert data == b"hello from the driver"
        fs, path = pafs.FileSystem.from_uri(dst)
        with fs.open_input_stream(path) as f:
            assert f.read() == b"hello from the driver via " + worker.node_id.encode()
    assert s3.keys("out/") == sorted(f"out/{w.name}.txt" for w in private_cluster.workers)
    assert s3.read("in/from-driver.txt") == b"hello from the driver"


def test_a_killed_worker_node_is_lost_and_a_replacement_joins(private_cluster):
    ray = private_cluster.connect()
    first, second = private_cluster.workers
    assert _alive_node_ids(ray) == {private_cluster.head.node_id, first.node_id, second.node_id}
    assert ray.cluster_resources().get("GPU") == 2

    pids = first.pids()
    assert len(pids) >= 3, "ray start, raylet and agents carry the node's marker"
    private_cluster.kill_worker(0)
    assert first.pids() == [], "no process of the lost node is left"
    _wait_for(lambda: first.node_id not in _alive_node_ids(ray), "the driver to see the loss")
    assert _alive_node_ids(ray) == {private_cluster.head.node_id, second.node_id}
    _wait_for(lambda: ray.cluster_resources().get("GPU") == 1, "one GPU left")
    assert private_cluster.alive_workers == [second]

    new = private_cluster.add_worker()
    assert new.resources == {"node_c": 1}
    assert _alive_node_ids(ray) == {private_cluster.head.node_id, second.node_id, new.node_id}
    _wait_for(lambda: ray.cluster_resources().get("GPU") == 2, "the replacement's GPU")
    secret = private_cluster.driver_only_dir / "secret.txt"
    secret.write_text("driver only")
    got = ray.get(_remote_look().options(resources={"node_c": 1}).remote(
        str(secret), str(private_cluster.shared_dir / "none"),
        str(private_cluster.driver_only_dir / "x.txt")), timeout=120)
    assert got["node_id"] == new.node_id
    assert got["hidden_exists"] is False, "the replacement is private too"


_JOIN = """
import sys
import ray
ray.init(**({"address": sys.argv[1]} if len(sys.argv) > 1 else {}))
print("JOINED", ray.get_runtime_context().gcs_address, flush=True)
"""


def _join(env, *address) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _JOIN, *address], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def test_ray_head_wants_its_token_from_a_driver_that_names_its_address(ray_head):
    """Measured with Ray 2.60 (the trap the product must handle): a default `ray start --head` on
    a machine with ~/.ray/auth_token turns token auth on. A driver with RAY_AUTH_MODE unset that
    finds the cluster itself (``ray.init()``, ``address="auto"``) turns it on too and joins; one
    given the address (``ray.init(address=...)``, RAY_ADDRESS, i.e. ``--address``) does not: after
    ~20 s of "InvalidAuthToken" log lines it raises a ConnectionError that never says why. With
    RAY_AUTH_MODE=token it joins."""
    env = ray_head.user_env()
    for name in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        assert name not in env
    assert ray_head.token and (ray_head.home / ".ray" / "auth_token").exists()
    port = ray_head.address.rsplit(":", 1)[1]

    runs = {  # side by side: each failure takes ~20 s
        "found": _join(env),
        "auto": _join(env, "auto"),
        "address": _join(env, ray_head.address),
        "RAY_ADDRESS": _join({**env, "RAY_ADDRESS": ray_head.address}),
        "address+token": _join({**env, "RAY_AUTH_MODE": "token"}, ray_head.address),
    }
    outs = {}
    for name, proc in runs.items():
        outs[name] = (proc.communicate(timeout=300)[0], proc.returncode)

    for name in ("address", "RAY_ADDRESS"):
        out, rc = outs[name]
        assert rc != 0 and "JOINED" not in out, (name, out[-3000:])
        assert "InvalidAuthToken" in out, (name, out[-3000:])
        assert "ConnectionError" in out, (name, out[-3000:])
    for name in ("found", "auto", "address+token"):
        out, rc = outs[name]
        assert rc == 0, (name, out[-3000:])
        joined = [line.split()[1] for line in out.splitlines() if line.startswith("JOINED")]
        assert joined and joined[0].endswith(":" + port), f"{name}: joined another cluster"
