"""Real multi-node Ray clusters and an S3 endpoint on one machine, for tests that must see what
breaks when nodes share nothing but the network and object storage.

* `S3Server`: a moto S3 server on a free loopback port (``python -m moto.server``). Its `env`
  (``AWS_ENDPOINT_URL`` & co.) is all that pyarrow's ``FileSystem.from_uri("s3://...")``, boto3
  and Ray nodes need to reach it unchanged.
* `RayCluster`: a head started with ``ray start --head ... --block`` plus worker nodes started with
  ``ray start --address ... --block``, each its own process group. Worker nodes can run in a
  private mount namespace with a tmpfs over chosen folders (``unshare -m``, needs root): their
  processes see those folders empty, while the head, the test process and every other process see
  the real ones -- separate disks, on one machine.

Every process of a node (``ray start``, raylet, agents, and the worker processes that raylet starts
in sessions of their own) carries ``KFOLD_RAY_TEST_NODE=<id>`` in its environment, so a node is
killed completely and at once (node loss) by finding its processes in /proc, even those that
outlived their parent; a watchdog process per cluster and per S3 server does the same if the test
process dies without cleaning up (SIGKILL, CI timeout). Nothing here ever runs ``ray stop`` (it
would stop every Ray on the machine). Each node gets a Ray temp dir of its own (``--temp-dir``
under one short folder per cluster): two nodes starting at once in one session dir race for the
same raylet socket name (the loser's raylet aborts with "bind: Address already in use"); and the
cluster neither overwrites /tmp/ray/ray_current_cluster (which a plain ``ray.init()`` elsewhere on
the machine would follow) nor leaves session logs behind (``KFOLD_RAY_KEEP_CLUSTER_LOGS=1`` keeps
them).

Ports: every node gets free ports of its own for what Ray otherwise binds at fixed numbers
(GCS 6379, Ray client server 10001, dashboard agent 52365, dashboard 8265), so clusters of several
tests or test sessions run side by side; the other ports Ray already picks freely.
"""

from __future__ import annotations

import functools
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

TESTS_DIR = Path(__file__).resolve().parent
PERMIT_DIR = TESTS_DIR / "permit"  # the fake-GPU permit (see tests/permit/sitecustomize.py)
PYTHON = sys.executable
MARKER = "KFOLD_RAY_TEST_NODE"
S3_KEY = "testing"
S3_REGION = "us-east-1"
# AWS variables that would take precedence over (or not fit) an `S3Server`'s env: dropped from
# every node's environment and, by the `s3` fixture, from this process's.
AWS_CONFLICTING_VARS = ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN",
                        "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL_S3")
# For `RayCluster(env=...)`: the GCS declares a killed node dead after ~4 s instead of Ray's
# default ~15 s (health checks every 3 s, 5 misses). Realism over speed is the default.
FAST_NODE_DEATH_ENV = {"RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000",
                       "RAY_health_check_failure_threshold": "3"}
# Ray's own variables that must not leak from the test process into a node (or a probe) by accident.
_RAY_DRIVER_VARS = ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH",
                    "RAY_TMPDIR", MARKER)


class ClusterError(RuntimeError):
    """A node or server did not come up (the message carries its log tail)."""


# ----------------------------------------------------------------------------------------------
# small helpers

_handed_out: set[int] = set()


def free_port() -> int:
    """A TCP port free on all interfaces right now, never the same one twice in this process."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port
    raise ClusterError("no free TCP port found")


def log_tail(path: Path | str, lines: int = 40) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError as e:
        return f"(no log at {path}: {e})"
    return "\n".join(text.splitlines()[-lines:])


def ray_cli() -> str:
    """The `ray` console script of this interpreter's environment."""
    here = Path(PYTHON).with_name("ray")
    found = str(here) if here.exists() else shutil.which("ray")
    if not found:
        raise ClusterError("no `ray` command next to the test interpreter or on PATH")
    return found


def pids_with_marker(value: str) -> list[int]:
    """Processes whose environment carries MARKER=value (Linux /proc; needs to be able to read it)."""
    needle = f"{MARKER}={value}\0".encode()
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/environ", "rb") as f:
                data = f.read()
        except OSError:
            continue
        if data.startswith(needle) or b"\0" + needle in data:
            found.append(int(entry.name))
    return [p for p in found if p != os.getpid()]


def _signal_all(pids, sig) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _wait_gone(pids, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    left = list(pids)
    while left and time.monotonic() < deadline:
        left = [p for p in left if _exists(p)]
        if left:
            time.sleep(0.1)
    return left


def _exists(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][:1] != "Z"  # zombies are dead, just not reaped
    except (OSError, IndexError):
        return False


# Outlives the test process in a session of its own: once that process is gone (SIGKILLed, a CI
# timeout) it kills every process whose MARKER starts with the prefix and removes a folder, so
# a test run that dies leaves no Ray node or S3 server behind. Stopped when the owner cleans up.
_WATCHDOG = r"""
import os, shutil, signal, sys, time
owner, needle, folder = int(sys.argv[1]), ("%s=%s" % (sys.argv[2], sys.argv[3])).encode(), sys.argv[4]
def gone(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(") ", 1)[1][:1] == "Z"
    except (OSError, IndexError):
        return True
while not gone(owner):
    time.sleep(1)
for _ in range(5):
    for e in os.scandir("/proc"):
        if e.name.isdigit() and int(e.name) != os.getpid():
            try:
                with open("/proc/%s/environ" % e.name, "rb") as f:
                    env = f.read()
                if env.startswith(needle) or b"\0" + needle in env:
                    os.kill(int(e.name), signal.SIGKILL)
            except OSError:
                pass
    time.sleep(1)
if folder:
    shutil.rmtree(folder, ignore_errors=True)
"""


def start_watchdog(marker_prefix: str, folder: Path | str | None = None) -> subprocess.Popen:
    """A process that, should this one die without cleaning up, kills every process whose
    ``KFOLD_RAY_TEST_NODE`` starts with `marker_prefix` and removes `folder`. Kill it (SIGKILL)
    once you have cleaned up yourself."""
    env = {k: v for k, v in os.environ.items() if k != MARKER}
    return subprocess.Popen([PYTHON, "-c", _WATCHDOG, str(os.getpid()), MARKER, marker_prefix,
                             str(folder or "")], env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def _stop_watchdog(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.wait()


@functools.lru_cache(maxsize=None)
def private_mounts_unavailable() -> str | None:
    """Why worker nodes with private folders cannot be started here, or None when they can
    (tried once: a tmpfs mounted in a private mount namespace)."""
    if not sys.platform.startswith("linux"):
        return "private mount namespaces need Linux"
    if os.geteuid() != 0:
        return "private mount namespaces (unshare -m, mount -t tmpfs) need root"
    if not shutil.which("unshare"):
        return "no `unshare` command (util-linux)"
    with tempfile.TemporaryDirectory() as d:
        try:
            r = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                                'mount -t tmpfs tmpfs "$0" && touch "$0/x"', d],
                               capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"unshare -m failed: {e}"
        if r.returncode != 0:
            return f"cannot mount a tmpfs in a private mount namespace: {r.stderr.strip()}"
        if os.listdir(d):
            return "a tmpfs mounted in a private mount namespace showed outside it"
    return None


def base_env(extra: dict | None = None, *, fake_gpu_permit: bool = True) -> dict[str, str]:
    """This process's environment without Ray's address/auth variables, tests/ on PYTHONPATH,
    and the fake-GPU permit with it unless ``fake_gpu_permit`` is False (then a fold that
    reserves a fake GPU meets the product's real check)."""
    env = {k: v for k, v in os.environ.items()
           if k not in _RAY_DRIVER_VARS and k not in AWS_CONFLICTING_VARS}
    paths = [str(TESTS_DIR)] + ([str(PERMIT_DIR)] if fake_gpu_permit else [])
    paths += [p for p in env.get("PYTHONPATH", "").split(os.pathsep)
              if p and (fake_gpu_permit or Path(p).resolve() != PERMIT_DIR)]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    env.update(extra or {})
    return env


def make_token_home(path: Path, real_home: Path | None = None) -> Path:
    """A HOME like the user's (symlinks to every entry of the real one: caches, configs) except
    for ``.ray``, which holds a fresh ``auth_token``: the state of a machine where a Ray token
    exists, without touching the real ~/.ray."""
    real_home = Path(real_home or os.path.expanduser("~"))
    path.mkdir(parents=True, exist_ok=True)
    if real_home.is_dir():
        for entry in real_home.iterdir():
            if entry.name != ".ray" and not (path / entry.name).exists():
                (path / entry.name).symlink_to(entry)
    (path / ".ray").mkdir(exist_ok=True)
    token = path / ".ray" / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    return path


# ----------------------------------------------------------------------------------------------
# S3


class S3Server:
    """A moto S3 server on 127.0.0.1 at a free port. ``with S3Server() as s3: ...`` or start/stop."""

    def __init__(self, log_dir: Path | str | None = None, timeout: float = 60.0):
        self._own_log_dir = log_dir is None
        self.log_dir = Path(log_dir or tempfile.mkdtemp(prefix="moto-"))
        self.timeout = timeout
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        self.log_path: Path | None = None
        self.startup_s: float | None = None
        self.marker = f"moto-{uuid.uuid4().hex[:12]}"
        self._watchdog: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        """What a process needs to use this server as its S3 (pyarrow, boto3, Ray nodes)."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": S3_KEY,
            "AWS_SECRET_ACCESS_KEY": S3_KEY,
            "AWS_DEFAULT_REGION": S3_REGION,
            "AWS_REGION": S3_REGION,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def start(self) -> "S3Server":
        t0 = time.monotonic()
        last = None
        if self._watchdog is None:
            self._watchdog = start_watchdog(self.marker, self.log_dir if self._own_log_dir else None)
        for _ in range(3):  # a port taken between free_port() and bind: try another
            self.port = free_port()
            self.log_path = self.log_dir / f"moto-{self.port}.log"
            env = dict(os.environ)
            env[MARKER] = self.marker
            env["NO_PROXY"] = env["no_proxy"] = ",".join(
                filter(None, ["127.0.0.1,localhost", env.get("NO_PROXY")]))
            with open(self.log_path, "wb") as log:
                self.proc = subprocess.Popen(
                    [PYTHON, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    start_new_session=True, env=env)
            try:
                self._wait_ready()
                self.startup_s = time.monotonic() - t0
                return self
            except ClusterError as e:
                last = e
                self.stop()
        raise last

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.timeout
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        while True:
            if self.proc.poll() is not None:
                raise ClusterError(f"moto S3 server exited with {self.proc.returncode}:\n"
                                   f"{log_tail(self.log_path)}")
            try:
                opener.open(self.endpoint + "/", timeout=2).close()
                return
            except urllib.error.HTTPError:
                return  # it answered
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise ClusterError(f"moto S3 server on port {self.port} did not answer within "
                                   f"{self.timeout:.0f} s:\n{log_tail(self.log_path)}")
            time.sleep(0.2)

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=S3_KEY,
                            aws_secret_access_key=S3_KEY, region_name=S3_REGION)

    def create_bucket(self, name: str | None = None) -> str:
        name = name or f"test-{uuid.uuid4().hex[:16]}"
        self.client().create_bucket(Bucket=name)
        return name

    def reset(self) -> None:
        """Forget every bucket and object (moto's reset API)."""
        req = urllib.request.Request(self.endpoint + "/moto-api/reset", method="POST")
        urllib.request.build_opener(urllib.request.ProxyHandler({})).open(req, timeout=10).close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(5)
            except ProcessLookupError:
                pass
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)

    def close(self) -> None:
        """Stop, and remove the log folder this server made for itself."""
        self.stop()
        _stop_watchdog(self._watchdog)
        self._watchdog = None
        if self._own_log_dir:
            shutil.rmtree(self.log_dir, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()


@dataclass
class S3Bucket:
    """A bucket on an `S3Server` (what the `s3` fixture gives a test)."""

    server: S3Server
    bucket: str

    @property
    def env(self) -> dict[str, str]:
        return self.server.env

    @property
    def endpoint(self) -> str:
        return self.server.endpoint

    def uri(self, *parts: str) -> str:
        """``s3://<bucket>/<parts joined by />``."""
        key = "/".join(p.strip("/") for p in parts if p)
        return f"s3://{self.bucket}/{key}" if key else f"s3://{self.bucket}"

    def new_bucket(self) -> str:
        """``s3://<a new bucket>`` on the same server."""
        return f"s3://{self.server.create_bucket()}"

    def client(self):
        return self.server.client()

    def keys(self, prefix: str = "") -> list[str]:
        """Every object key under `prefix` (boto3, paginated), sorted."""
        pages = self.client().get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))

    def read(self, key: str) -> bytes:
        return self.client().get_object(Bucket=self.bucket, Key=key)["Body"].read()

    def write(self, key: str, data: bytes) -> None:
        self.client().put_object(Bucket=self.bucket, Key=key, Body=data)


# ----------------------------------------------------------------------------------------------
# Ray

# Runs in a subprocess (the test process stays free to ray.init itself): joins the cluster, waits
# until the nodes with the wanted node-manager ports are alive (and the unwanted ones are not),
# prints {"alive": {port: node_id}} or {"error": ...}.
_PROBE = r"""
import json, sys, time
import ray
addr, want, timeout = sys.argv[1], json.loads(sys.argv[2]), float(sys.argv[3])
deadline = time.monotonic() + timeout
last = "not connected"
while True:
    try:
        if not ray.is_initialized():
            ray.init(address=addr, log_to_driver=False)
        alive = {n["NodeManagerPort"]: n["NodeID"] for n in ray.nodes() if n["Alive"]}
        if all(p in alive for p in want["alive"]) and not any(p in alive for p in want["dead"]):
            print("PROBE " + json.dumps({"alive": alive}), flush=True)
            break
        last = "alive node-manager ports: %s" % sorted(alive)
    except Exception as e:
        last = "%s: %s" % (type(e).__name__, str(e)[:2000])
        try:
            ray.shutdown()
        except Exception:
            pass
    if time.monotonic() > deadline:
        print("PROBE " + json.dumps({"error": last}), flush=True)
        sys.exit(3)
    time.sleep(0.5)
ray.shutdown()
"""


@dataclass
class RayNode:
    """One ``ray start ... --block`` process group (a Ray node) and everything it started."""

    name: str
    proc: subprocess.Popen
    log_path: Path  # `ray start` output
    temp_dir: Path  # its --temp-dir (session dirs, sockets, logs)
    node_manager_port: int
    marker: str
    num_cpus: int
    num_gpus: int
    resources: dict
    hidden_dirs: tuple[Path, ...] = ()
    node_id: str | None = None
    startup_s: float | None = None
    killed: bool = False
    started_at: float = field(default_factory=time.monotonic)

    @property
    def running(self) -> bool:
        return not self.killed and self.proc.poll() is None

    def pids(self) -> list[int]:
        own = {self.proc.pid} if self.proc.poll() is None else set()
        return sorted(set(pids_with_marker(self.marker)) | own)

    def signal(self, sig) -> None:
        """Send `sig` to every process of the node (its process group and all marked ones)."""
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        _signal_all(self.pids(), sig)

    def kill(self, grace: float = 0.0) -> None:
        """Every process of the node at once: SIGKILL (node loss), or SIGTERM first when grace > 0."""
        self.killed = True
        if grace > 0:
            self.signal(signal.SIGTERM)
            _wait_gone(self.pids(), grace)
        for _ in range(3):  # a raylet may still start a worker while we kill: look again
            pids = self.pids()
            self.signal(signal.SIGKILL)
            _wait_gone(pids, 10)
            if not self.pids():
                break
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass

    @property
    def ray_logs(self) -> Path:
        """This node's Ray logs (raylet.out, gcs_server.out on the head, workers' logs)."""
        return self.temp_dir / "session_latest" / "logs"

    def log(self, lines: int = 40) -> str:
        return log_tail(self.log_path, lines)

    def diagnostics(self, lines: int = 25) -> str:
        """The `ray start` output tail and the errors in this node's raylet/GCS logs."""
        parts = [f"--- {self.name}: `ray start` output ({self.log_path}):", self.log(lines)]
        for name in ("raylet.out", "raylet.err", "gcs_server.out", "gcs_server.err"):
            path = self.ray_logs / name
            if path.exists():
                bad = [ln for ln in path.read_text(errors="replace").splitlines()
                       if " E " in ln[:40] or " F " in ln[:40] or "rror" in ln]
                if bad:
                    parts += [f"--- {self.name}: errors in {path}:", "\n".join(bad[-10:])]
        return "\n".join(parts)


class RayCluster:
    """A Ray cluster of ``ray start`` nodes on this machine.

    Args:
        head_cpus / head_gpus / head_resources: the head node's logical resources.
        env: extra environment for every node (e.g. an S3 server's `env`).
        auth_mode: ``RAY_AUTH_MODE`` of every node ("disabled", "token"), or None to leave it
            unset: Ray's defaults, where ``ray start --head`` turns token auth on if it finds a
            token (``home`` / ``make_token_home``).
        home: HOME of every node (and of `driver_env`), e.g. one from `make_token_home`.
        object_store_memory: per node, bytes.
        timeout: seconds a node may take to come up (2 cores: be generous).
        include_dashboard: the head's dashboard (on a free port).
        fake_gpu_permit: nodes and drivers start with the test-only fake-GPU permit (default);
            False: they meet the product's real check (a fold that reserved a GPU CUDA cannot
            use stops).
    """

    def __init__(self, *, head_cpus: int = 1, head_gpus: int = 0,
                 head_resources: dict | None = None, env: dict | None = None,
                 auth_mode: str | None = "disabled", home: Path | str | None = None,
                 object_store_memory: int = 200_000_000, timeout: float = 180.0,
                 include_dashboard: bool = False, fake_gpu_permit: bool = True):
        self.head_cpus, self.head_gpus = head_cpus, head_gpus
        self.head_resources = dict(head_resources or {})
        self.extra_env = dict(env or {})
        self.auth_mode = auth_mode
        self.home = Path(home) if home else None
        self.object_store_memory = object_store_memory
        self.timeout = timeout
        self.include_dashboard = include_dashboard
        self.fake_gpu_permit = fake_gpu_permit
        self.id = uuid.uuid4().hex[:8]
        # Short: Ray's unix sockets live under it (108-byte limit on socket paths).
        self.temp_dir = Path(tempfile.mkdtemp(prefix=f"kr{self.id[:6]}", dir="/tmp"))
        self.port: int | None = None
        self.head: RayNode | None = None
        self.workers: list[RayNode] = []  # in the order added, killed ones included
        self._count = 0
        self._watchdog: subprocess.Popen | None = None

    # -- addresses and environments --------------------------------------------------------------
    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def node_env(self, marker: str, extra: dict | None = None) -> dict[str, str]:
        env = base_env({**self.extra_env, **(extra or {})}, fake_gpu_permit=self.fake_gpu_permit)
        if self.auth_mode is not None:
            env["RAY_AUTH_MODE"] = self.auth_mode
        if self.home:
            env["HOME"] = str(self.home)
        env[MARKER] = marker
        return env

    def driver_env(self, *, auth_mode: str | None = "same", address: bool = False,
                   extra: dict | None = None) -> dict[str, str]:
        """Environment for a driver subprocess on the head's machine: the nodes' (S3 variables,
        PYTHONPATH, HOME) without Ray's variables, except ``RAY_AUTH_MODE`` = the cluster's (or
        `auth_mode`; None: unset) and, if `address`, ``RAY_ADDRESS``. ``RAY_TMPDIR`` points at
        this cluster's temp root, so Ray's own lookup of "the cluster running on this node"
        (``ray.init()`` without address, ``address="auto"``) finds this cluster and not whichever
        cluster another test session started last in /tmp/ray."""
        env = base_env({**self.extra_env, **(extra or {})}, fake_gpu_permit=self.fake_gpu_permit)
        env["RAY_TMPDIR"] = str(self.temp_dir)
        mode = self.auth_mode if auth_mode == "same" else auth_mode
        if mode is not None:
            env["RAY_AUTH_MODE"] = mode
        if self.home:
            env["HOME"] = str(self.home)
        if address:
            env["RAY_ADDRESS"] = self.address
        return env

    def user_env(self, **kw) -> dict[str, str]:
        """`driver_env` with RAY_AUTH_MODE unset: a user's shell on the head's machine."""
        return self.driver_env(auth_mode=None, **kw)

    @property
    def token(self) -> str | None:
        """The auth token in the nodes' HOME (`home`, else this process's), if any."""
        path = (self.home or Path(os.path.expanduser("~"))) / ".ray" / "auth_token"
        return path.read_text().strip() if path.is_file() else None

    def _probe_env(self) -> dict[str, str]:
        # A head left to Ray's defaults turns token auth on when it finds a token in its HOME.
        mode = self.auth_mode
        if mode is None and self.token:
            mode = "token"
        return self.driver_env(auth_mode=mode)

    # -- nodes -----------------------------------------------------------------------------------
    def _node_temp_dir(self, name: str) -> Path:
        # The head's is <root>/ray, where Ray's own lookup (RAY_TMPDIR=<root>, see driver_env)
        # finds "the cluster running on this node"; the workers' are <root>/<name>.
        return self.temp_dir / ("ray" if name == "head" else name)

    def _common_args(self, name, num_cpus, num_gpus, resources, nm_port) -> list[str]:
        args = ["--num-cpus", str(num_cpus), "--num-gpus", str(num_gpus),
                "--object-store-memory", str(self.object_store_memory),
                "--temp-dir", str(self._node_temp_dir(name)),
                "--node-manager-port", str(nm_port), "--object-manager-port", str(free_port()),
                "--dashboard-agent-listen-port", str(free_port()),
                "--disable-usage-stats", "--block"]
        if resources:
            args += ["--resources", json.dumps(resources)]
        return args

    def _spawn(self, name, argv, env, *, num_cpus, num_gpus, resources, nm_port,
               hidden_dirs=()) -> RayNode:
        log_path = self.temp_dir / f"{name}.log"
        if hidden_dirs:
            # Own mount namespace, a tmpfs over each hidden folder, then exec `ray start`: the
            # node and every process it starts see those folders empty.
            script = ('set -e; n=$1; shift; while [ "$n" -gt 0 ]; do '
                      'mount -t tmpfs -o size=2g tmpfs "$1"; shift; n=$((n-1)); done; exec "$@"')
            argv = ["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh",
                    str(len(hidden_dirs)), *map(str, hidden_dirs), *argv]
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        return RayNode(name=name, proc=proc, log_path=log_path,
                       temp_dir=self._node_temp_dir(name), node_manager_port=nm_port,
                       marker=env[MARKER], num_cpus=num_cpus, num_gpus=num_gpus,
                       resources=dict(resources or {}), hidden_dirs=tuple(map(Path, hidden_dirs)))

    def start(self) -> "RayCluster":
        if self.head is not None:
            raise ClusterError("cluster already started")
        self._watchdog = start_watchdog(f"{self.id}-", self.temp_dir)
        self.port = free_port()
        nm_port = free_port()
        marker = f"{self.id}-head"
        argv = [ray_cli(), "start", "--head", "--port", str(self.port),
                "--ray-client-server-port", str(free_port()),
                f"--include-dashboard={'true' if self.include_dashboard else 'false'}",
                "--dashboard-port", str(free_port()),
                *self._common_args("head", self.head_cpus, self.head_gpus, self.head_resources, nm_port)]
        self.head = self._spawn("head", argv, self.node_env(marker), num_cpus=self.head_cpus,
                                num_gpus=self.head_gpus, resources=self.head_resources,
                                nm_port=nm_port)
        try:
            self._wait([self.head])
        except BaseException:
            self.shutdown()
            raise
        self.head.startup_s = time.monotonic() - self.head.started_at
        return self

    def add_worker(self, *, num_cpus: int = 2, num_gpus: int = 1,
                   resources: dict | None = None, hidden_dirs=(), env: dict | None = None,
                   wait: bool = True) -> RayNode:
        """A worker node; with `hidden_dirs`, in a private mount namespace where those folders
        are empty tmpfs (created here if missing). Returns once it is alive in the cluster
        (unless not `wait`: then call `wait_for_workers`)."""
        if self.head is None:
            raise ClusterError("start the cluster first")
        if hidden_dirs:
            reason = private_mounts_unavailable()
            if reason:
                raise ClusterError(reason)
            for d in hidden_dirs:
                Path(d).mkdir(parents=True, exist_ok=True)
        name = f"w{self._count}"
        self._count += 1
        nm_port = free_port()
        argv = [ray_cli(), "start", "--address", self.address,
                *self._common_args(name, num_cpus, num_gpus, resources, nm_port)]
        node = self._spawn(name, argv, self.node_env(f"{self.id}-{name}", env),
                           num_cpus=num_cpus, num_gpus=num_gpus, resources=resources,
                           nm_port=nm_port, hidden_dirs=tuple(hidden_dirs))
        self.workers.append(node)
        if wait:
            self.wait_for_workers([node])
        return node

    def wait_for_workers(self, nodes=None) -> None:
        nodes = [n for n in (nodes if nodes is not None else self.workers) if n.node_id is None]
        if nodes:
            self._wait(nodes)
            for n in nodes:
                n.startup_s = time.monotonic() - n.started_at

    @property
    def alive_workers(self) -> list[RayNode]:
        return [n for n in self.workers if n.running]

    def kill_worker(self, which: int | RayNode = 0, *, wait: bool = True,
                    timeout: float = 120.0) -> RayNode:
        """Node loss: SIGKILL every process of a worker node at once (`which`: an index into
        `workers` or a node); with `wait`, return once the cluster marks it dead."""
        node = self.workers[which] if isinstance(which, int) else which
        node.kill()
        if wait:
            self._wait([], dead=[node], timeout=timeout)
        return node

    # -- waiting ---------------------------------------------------------------------------------
    def _wait(self, nodes: list[RayNode], dead: list[RayNode] = (), timeout: float | None = None):
        timeout = timeout or self.timeout
        want = {"alive": [n.node_manager_port for n in nodes],
                "dead": [n.node_manager_port for n in dead]}
        # Output to a file: a pipe nobody reads while waiting could fill up with Ray's retries.
        out_path = self.temp_dir / f"probe-{uuid.uuid4().hex[:8]}.log"
        with open(out_path, "wb") as out_file:
            probe = subprocess.Popen(
                [PYTHON, "-c", _PROBE, self.address, json.dumps(want), str(timeout)],
                stdout=out_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=self._probe_env(), start_new_session=True)
        deadline = time.monotonic() + timeout + 60
        try:
            while probe.poll() is None:
                for n in nodes + ([self.head] if self.head not in nodes else []):
                    if n is not None and not n.killed and n.proc.poll() is not None:
                        raise ClusterError(
                            f"Ray node {n.name} of {self.address} exited with "
                            f"{n.proc.returncode} while starting (Ray logs: {n.ray_logs}):\n"
                            f"{n.diagnostics()}")
                if time.monotonic() > deadline:
                    raise ClusterError(f"probe of {self.address} hung")
                time.sleep(0.2)
        finally:
            if probe.poll() is None:
                os.killpg(probe.pid, signal.SIGKILL)
                probe.wait()
        out = out_path.read_text(errors="replace")
        out_path.unlink()
        result = None
        for line in out.splitlines():
            if line.startswith("PROBE "):
                result = json.loads(line[6:])
        if not result or "error" in result:
            what = ", ".join(n.name for n in nodes) or "-"
            gone = ", ".join(n.name for n in dead) or "-"
            tails = "\n".join(n.diagnostics() for n in nodes)
            raise ClusterError(
                f"cluster {self.address}: nodes [{what}] not alive / [{gone}] not dead within "
                f"{timeout:.0f} s: {(result or {}).get('error') or 'probe failed'}\n"
                f"probe output tail:\n{out[-3000:]}\n{tails}")
        alive = {int(k): v for k, v in result["alive"].items()}
        for n in nodes:
            n.node_id = alive[n.node_manager_port]

    def connect(self, **kwargs):
        """``ray.init`` this process to the cluster (no log forwarding); returns the ray module."""
        import ray

        kwargs.setdefault("log_to_driver", False)
        kwargs.setdefault("configure_logging", False)
        ray.init(address=self.address, **kwargs)
        return ray

    def disconnect_if_connected(self) -> None:
        """``ray.shutdown()`` when this process is a driver of this cluster."""
        try:
            import ray

            if ray.is_initialized():
                gcs = ray.get_runtime_context().gcs_address
                if gcs.rsplit(":", 1)[-1] == str(self.port):
                    ray.shutdown()
        except Exception:  # noqa: BLE001 - teardown must go on
            pass

    # -- teardown --------------------------------------------------------------------------------
    def shutdown(self, grace: float = 1.0) -> None:
        """Stop every node at once (SIGTERM, then SIGKILL after `grace` s), never with
        `ray stop`; remove the Ray temp dir. Disconnects this process first if it is a driver of
        the cluster."""
        self.disconnect_if_connected()
        nodes = [n for n in [*self.workers, self.head] if n is not None]
        for n in nodes:
            n.killed = True
            n.signal(signal.SIGTERM)
        _wait_gone([p for n in nodes for p in n.pids()], grace)
        for n in nodes:
            n.kill()
        _stop_watchdog(self._watchdog)
        self._watchdog = None
        if not os.environ.get("KFOLD_RAY_KEEP_CLUSTER_LOGS"):
            shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.shutdown()


@dataclass
class PrivateCluster:
    """What the `private_cluster` fixture gives a test: a `RayCluster` whose worker nodes all
    hide `driver_only_dir`, with the `s3` bucket's variables in every node's environment."""

    cluster: RayCluster
    driver_only_dir: Path  # the driver (and the head node) see its files; worker nodes see none
    shared_dir: Path  # every node sees it: for test control files, never for product data
    s3: S3Bucket | None = None

    @property
    def address(self) -> str:
        return self.cluster.address

    @property
    def head(self) -> RayNode:
        return self.cluster.head

    @property
    def workers(self) -> list[RayNode]:
        """Every worker node added, in order, killed ones included (see `alive_workers`)."""
        return self.cluster.workers

    @property
    def alive_workers(self) -> list[RayNode]:
        return self.cluster.alive_workers

    def driver_env(self, **kw) -> dict[str, str]:
        return self.cluster.driver_env(**kw)

    def connect(self, **kw):
        return self.cluster.connect(**kw)

    def kill_worker(self, which: int | RayNode = 0, **kw) -> RayNode:
        return self.cluster.kill_worker(which, **kw)

    def add_worker(self, *, resources: dict | None = None, num_cpus: int = 2,
                   num_gpus: int = 1, wait: bool = True, **kw) -> RayNode:
        """One more private worker node like the others (same hidden folder), by default with
        resource ``node_<letter>``, the next letter (node_a, node_b, then node_c, ...)."""
        if resources is None:
            resources = {f"node_{chr(ord('a') + len(self.cluster.workers))}": 1}
        return self.cluster.add_worker(num_cpus=num_cpus, num_gpus=num_gpus, resources=resources,
                                       hidden_dirs=(self.driver_only_dir,), wait=wait, **kw)

    def wait_for_workers(self) -> None:
        self.cluster.wait_for_workers()


# ---- an autoscaling cluster: Ray's fake multi-node provider ----------------------------------------
class FakeAutoscalingCluster:
    """A ``ray start --head`` whose autoscaler launches nodes as cluster.yaml's would: Ray's own
    fake multi-node provider (``RAY_FAKE_CLUSTER=1``, provider ``fake_multinode``) starts a real
    Ray node on this machine for each node it "launches", with the node type's logical
    resources (fake GPUs: the tests' permit lets their folds train on CPU).

    The head has no GPU and ``head_cpus`` CPUs; ``worker_types`` are cluster.yaml's
    ``available_node_types`` entries (``resources``, ``max_workers``; ``min_workers`` 0, as in
    cluster.yaml). The dashboard (with its job server) is on, so ``ray job submit`` works. Every
    node gets ``env`` (e.g. an S3 server's) and the nodes' usual test environment. Stopped by
    killing every process that carries its marker (never ``ray stop``).
    """

    def __init__(self, worker_types: dict, *, head_cpus: int = 2, env: dict | None = None,
                 timeout: float = 180.0):
        self.worker_types = worker_types
        self.head_cpus = head_cpus
        self.extra_env = dict(env or {})
        self.timeout = timeout
        self.id = uuid.uuid4().hex[:8]
        self.temp_dir = Path(tempfile.mkdtemp(prefix=f"ka{self.id[:6]}", dir="/tmp"))
        self.port = free_port()
        self.dashboard_port = free_port()
        self.marker = f"{self.id}-autoscaling"
        self.proc: subprocess.Popen | None = None
        self._watchdog: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def config(self) -> dict:
        ip = _node_ip()
        return {
            "cluster_name": f"fake-{self.id}", "max_workers": 8, "upscaling_speed": 1.0,
            "idle_timeout_minutes": 5,
            "provider": {"type": "fake_multinode", "use_node_id_as_ip": True,
                         "disable_node_updaters": True, "disable_launch_config_check": True,
                         # The fake nodes dial 6379 unless told where the GCS is.
                         "gcs_address": f"{ip}:{self.port}"},
            "auth": {"ssh_user": "ubuntu"},
            # The fake provider names the head's type ray.head.default.
            "available_node_types": {
                "ray.head.default": {"resources": {"CPU": self.head_cpus}, "node_config": {},
                                     "max_workers": 0},
                **{name: {"min_workers": 0, "node_config": {}, **spec}
                   for name, spec in self.worker_types.items()},
            },
            "head_node_type": "ray.head.default",
            "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
            "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
            "worker_setup_commands": [], "head_start_ray_commands": [],
            "worker_start_ray_commands": [],
        }

    def env(self) -> dict[str, str]:
        env = base_env(self.extra_env)
        env.update({"RAY_AUTH_MODE": "disabled", "RAY_TMPDIR": str(self.temp_dir),
                    "RAY_FAKE_CLUSTER": "1", MARKER: self.marker})
        return env

    def driver_env(self) -> dict[str, str]:
        """For `ray job` commands and drivers: no marker (they are not the cluster's nodes)."""
        env = self.env()
        del env[MARKER], env["RAY_FAKE_CLUSTER"]
        return env

    def start(self) -> "FakeAutoscalingCluster":
        import yaml

        self._watchdog = start_watchdog(self.marker, self.temp_dir)
        cfg = self.temp_dir / "autoscaling.yaml"
        cfg.write_text(yaml.safe_dump(self.config()))
        argv = [ray_cli(), "start", "--head", "--port", str(self.port),
                "--num-cpus", str(self.head_cpus), "--num-gpus", "0",
                f"--autoscaling-config={cfg}", "--include-dashboard=true",
                "--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.dashboard_port),
                "--ray-client-server-port", str(free_port()),
                "--metrics-export-port", str(free_port()),
                "--dashboard-agent-listen-port", str(free_port()),
                "--temp-dir", str(self.temp_dir / "ray"), "--disable-usage-stats", "--block"]
        self.log_path = self.temp_dir / "head.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=self.env(),
                                         start_new_session=True)
        deadline = time.monotonic() + self.timeout
        while b"Ray runtime started" not in self.log_path.read_bytes():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = log_tail(self.log_path)
                self.shutdown()
                raise ClusterError(f"the autoscaling head did not start:\n{tail}")
            time.sleep(0.5)
        self._wait_for_job_server(deadline)
        return self

    def _wait_for_job_server(self, deadline: float) -> None:
        import urllib.request

        while True:
            try:
                with urllib.request.urlopen(f"{self.dashboard_url}/api/version", timeout=5):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise ClusterError(f"no dashboard at {self.dashboard_url}:\n{log_tail(self.log_path)}")
                time.sleep(1)

    def ray(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """A ``ray`` CLI command against this cluster (``ray job submit ...``)."""
        return subprocess.run([ray_cli(), *args], env=self.driver_env(), capture_output=True,
                              text=True, timeout=timeout)

    def shutdown(self, grace: float = 2.0) -> None:
        pids = pids_with_marker(self.marker)
        _signal_all(pids, signal.SIGTERM)
        _signal_all(_wait_gone(pids, grace), signal.SIGKILL)
        _wait_gone(pids, 10)
        _stop_watchdog(self._watchdog)
        self._watchdog = None
        if not os.environ.get("KFOLD_RAY_KEEP_CLUSTER_LOGS"):
            shutil.rmtree(self.temp_dir, ignore_errors=True)


def _node_ip() -> str:
    import ray._private.services as services

    return services.get_node_ip_address()


def init_local_ray(**kwargs):
    """``ray.init`` of a new local cluster of the test's own (``address="local"``: never one that
    another process on this machine happens to run, which ``ray.init()`` alone would join), quiet."""
    import ray

    kwargs.setdefault("address", "local")
    ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False, **kwargs)
    return ray
