"""cluster.yaml: valid for Ray's cluster launcher, with GPU workers and the project installed.

Also the pins every node installs (constraints.txt, used by scripts/setup.sh).
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml")
jsonschema = pytest.importorskip("jsonschema")
ray_autoscaler = pytest.importorskip("ray.autoscaler")
from ray.autoscaler._private.util import prepare_config, validate_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROJECT_ON_NODE = "/home/ubuntu/kfold-ray"
VENV_RAY = "~/kfold-ray/.venv/bin/ray"
WORKER_PROFILE = "kfold-ray-worker"  # created by scripts/aws_iam.sh

# EC2 RunInstances parameters a node_config may use. Ray's schema leaves node_config free-form
# (it is passed to boto3 as is), so a misspelled key there would only fail at launch time.
EC2_NODE_CONFIG_KEYS = {
    "InstanceType", "ImageId", "BlockDeviceMappings", "InstanceMarketOptions", "KeyName",
    "SubnetIds", "SecurityGroupIds", "IamInstanceProfile", "TagSpecifications", "Placement",
    "NetworkInterfaces", "UserData", "LaunchTemplate", "MetadataOptions", "EbsOptimized",
    "CapacityReservationSpecification",
}


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    path = Path(ray_autoscaler.__file__).parent / "ray-schema.json"
    return json.loads(path.read_text())


def _validate(config: dict[str, Any], schema: dict[str, Any]) -> None:
    """Both checks `ray up` makes before it touches AWS: the raw file, then with defaults."""
    jsonschema.validate(config, schema)
    validate_config(prepare_config(copy.deepcopy(config)))


def test_valid_for_rays_launcher(config, schema) -> None:
    _validate(config, schema)
    assert config["cluster_name"] == "kfold-ray"
    assert config["provider"]["type"] == "aws"
    assert config["provider"]["region"] == "us-west-2"


def test_node_configs_use_only_ec2_keys(config) -> None:
    for name, node_type in config["available_node_types"].items():
        node_config = node_type["node_config"]
        assert set(node_config) <= EC2_NODE_CONFIG_KEYS, (name, set(node_config))
        assert node_config["InstanceType"] and node_config["ImageId"], name


def test_head_runs_the_driver_and_workers_declare_gpus(config) -> None:
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("CPU", 1) > 0  # the head must be able to run the driver
    assert head["resources"].get("GPU", 0) == 0
    workers = {n: t for n, t in types.items() if n != config["head_node_type"]}
    gpu_workers = {n: t for n, t in workers.items() if t["resources"].get("GPU", 0) >= 1}
    assert gpu_workers, "no worker type declares a GPU"
    for name, node_type in gpu_workers.items():
        assert node_type["node_config"]["InstanceType"].startswith(("g5.", "g6.", "p")), name
        assert node_type.get("min_workers", 0) == 0, f"{name}: GPUs should start on demand"
        assert node_type["max_workers"] >= 1
    assert config["max_workers"] >= max(t["max_workers"] for t in gpu_workers.values())


def test_setup_installs_the_project_on_every_node(config) -> None:
    assert config["file_mounts"] == {PROJECT_ON_NODE: "."}
    assert ".gitignore" in config["rsync_filter"]  # keeps the local .venv and runs/ behind
    setup = " && ".join(config["setup_commands"])
    # Node mode: torch, Ray (default + train extras), kfold-ray, Detectron2; no test extras, no apt.
    assert "cd ~/kfold-ray && bash scripts/setup.sh --node" in setup
    assert setup.count("scripts/setup.sh") == 1
    # setup.sh installs the pinned ray[default,train]: no second, unpinned Ray install here.
    assert "ray[" not in setup and "pip install" not in setup
    head_setup = " && ".join(config["head_setup_commands"])
    assert "boto3" in head_setup and "-c constraints.txt" in head_setup
    assert not config.get("worker_setup_commands")


def test_node_setup_mode() -> None:
    setup = ROOT / "scripts" / "setup.sh"
    usage = subprocess.run(["bash", str(setup), "--help"], capture_output=True, text=True)
    assert usage.returncode == 0 and "--node" in usage.stdout
    # An unknown flag stops before anything is created.
    bad = subprocess.run(["bash", str(setup), "--nod"], capture_output=True, text=True)
    assert bad.returncode == 2 and "usage" in bad.stderr
    text = setup.read_text()
    assert 'install -c constraints.txt -e ".[test,review]"' in text  # the default: CI and development
    assert "install -c constraints.txt -e ." in text  # --node: no extras
    assert "PIP_CONSTRAINT=constraints.txt" in text  # Detectron2's own pip runs
    assert "constraints.txt" in re.search(r"inputs=\(([^)]*)\)", text).group(1)  # in the stamp


def test_every_node_type_reaches_s3_through_an_instance_profile(config) -> None:
    types = config["available_node_types"]
    head = types[config["head_node_type"]]["node_config"]
    # The head gets Ray's default profile, which Ray creates with S3 access: ray-autoscaler-v1.
    assert "IamInstanceProfile" not in head
    ray_aws = (Path(ray_autoscaler.__file__).parent / "_private" / "aws" / "config.py").read_text()
    assert 'RAY = "ray-autoscaler"' in ray_aws
    assert 'DEFAULT_RAY_INSTANCE_PROFILE = RAY + "-v1"' in ray_aws
    assert "arn:aws:iam::aws:policy/AmazonS3FullAccess" in ray_aws
    # Ray gives workers no profile: each worker type names ours.
    workers = {n: t["node_config"] for n, t in types.items() if n != config["head_node_type"]}
    assert workers
    for name, node_config in workers.items():
        assert node_config.get("IamInstanceProfile") == {"Name": WORKER_PROFILE}, name
    # scripts/aws_iam.sh creates that profile with S3 access and lets the head pass it on.
    iam = (ROOT / "scripts" / "aws_iam.sh").read_text()
    assert f"WORKER={WORKER_PROFILE}\n" in iam and "HEAD=ray-autoscaler-v1 " in iam
    assert 'attach "$worker_role" AmazonS3FullAccess' in iam
    assert '"Action\\":\\"iam:PassRole\\"' in iam and "role/$worker_role" in iam
    subprocess.run(["bash", "-n", str(ROOT / "scripts" / "aws_iam.sh")], check=True)


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[_norm(name)] = version
    return pins


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_the_ray_started_is_the_pinned_one(config) -> None:
    import ray

    pinned = _pins()["ray"]
    # Every node starts ~/kfold-ray/.venv/bin/ray, which scripts/setup.sh installed under the pins,
    # as it did this environment's (the Ray that `ray up` runs locally must be the same version).
    assert "-c constraints.txt" in (ROOT / "scripts" / "setup.sh").read_text()
    assert ray.__version__ == pinned, "run scripts/setup.sh (or scripts/lock.sh) again"
    for command in config["head_start_ray_commands"] + config["worker_start_ray_commands"]:
        for ray_cli in re.findall(r"\S*\bray (?:start|stop)\b", command):
            assert ray_cli.startswith(f"{VENV_RAY} "), command


def test_head_and_workers_use_the_same_venv(config) -> None:
    # One set-up, in setup_commands (every node type), creates ~/kfold-ray/.venv; the head's extra
    # install (boto3) goes into it too, and every node starts Ray from it.
    assert "cd ~/kfold-ray && bash scripts/setup.sh --node" in config["setup_commands"]
    for command in config["head_setup_commands"] + config["worker_setup_commands"]:
        assert command.startswith("cd ~/kfold-ray && .venv/bin/python -m pip install "), command
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert all(VENV_RAY in command for command in config[key]), key
    # One AMI, so one Python, on every node type.
    assert len({t["node_config"]["ImageId"] for t in config["available_node_types"].values()}) == 1


def test_every_direct_requirement_is_pinned() -> None:
    tomllib = pytest.importorskip("tomllib")
    from packaging.requirements import Requirement

    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import install_detectron2
    finally:
        sys.path.pop(0)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [*project["dependencies"], *project["optional-dependencies"]["test"],
              *install_detectron2.RUNTIME_REQUIREMENTS, *install_detectron2.BUILD_REQUIREMENTS,
              "boto3"]
    pins = _pins()
    names = {Requirement(r).name for r in wanted}
    missing = sorted(name for name in names if _norm(name) not in pins)
    assert not missing, f"not in constraints.txt: {missing}; run scripts/lock.sh"
    for r in wanted:  # and each pin within its range
        req = Requirement(r)
        pinned = pins[_norm(req.name)]
        assert req.specifier.contains(pinned, prereleases=True), (r, pinned)
    assert "kfold-ray" not in pins and "detectron2" not in pins


def test_ray_is_started_from_the_project_venv(config) -> None:
    head = config["head_start_ray_commands"]
    workers = config["worker_start_ray_commands"]
    assert head[0] == f"{VENV_RAY} stop" and workers[0] == f"{VENV_RAY} stop"
    assert f"{VENV_RAY} start --head --port=6379" in head[1]
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head[1]
    assert "--dashboard-port=8265" in head[1] and "--dashboard-host=0.0.0.0" in head[1]
    assert f"{VENV_RAY} start --address=$RAY_HEAD_IP:6379" in workers[1]


def test_the_head_starts_prometheus_after_ray(config) -> None:
    # The dashboard's Metrics view (and Grafana) read the fold metrics from a Prometheus on the
    # head; Ray's launcher downloads it (it reaches GitHub on AWS) and scrapes every node.
    head = config["head_start_ray_commands"]
    starts = [i for i, c in enumerate(head) if f"{VENV_RAY} start --head" in c]
    launches = [i for i, c in enumerate(head) if f"{VENV_RAY} metrics launch-prometheus" in c]
    assert len(starts) == 1 and len(launches) == 1 and launches[0] > starts[0], head
    launch = head[launches[0]]
    assert "nohup" in launch and launch.rstrip().endswith("&"), "it must outlive `ray up`'s shell"
    assert launch.index("shutdown-prometheus") < launch.index("launch-prometheus")
    assert not any("prometheus" in c for c in config["worker_start_ray_commands"])


def _rename(config: dict[str, Any], path: tuple[str, ...], new_key: str) -> dict[str, Any]:
    bad = copy.deepcopy(config)
    parent = bad
    for key in path[:-1]:
        parent = parent[key]
    parent[new_key] = parent.pop(path[-1])
    return bad


@pytest.mark.parametrize(
    ("path", "new_key"),
    [
        (("setup_commands",), "setup_comands"),
        (("head_start_ray_commands",), "head_start_commands"),
        (("idle_timeout_minutes",), "idle_timeout_minute"),
        (("available_node_types", "ray.worker.gpu", "min_workers"), "min_worker"),
        (("available_node_types", "ray.worker.gpu", "resources"), "resource"),
    ],
)
def test_misspelled_key_is_rejected(config, schema, path, new_key) -> None:
    bad = _rename(config, path, new_key)
    with pytest.raises(jsonschema.ValidationError, match=new_key.replace(".", r"\.")):
        jsonschema.validate(bad, schema)
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(copy.deepcopy(bad)))


def test_misspelled_node_config_key_is_caught_here(config) -> None:
    bad = _rename(config, ("available_node_types", "ray.worker.gpu", "node_config",
                           "InstanceType"), "InstanceTyp")
    keys = set(bad["available_node_types"]["ray.worker.gpu"]["node_config"])
    assert keys - EC2_NODE_CONFIG_KEYS == {"InstanceTyp"}


def test_gpu_count_must_be_an_integer(config, schema) -> None:
    bad = copy.deepcopy(config)
    bad["available_node_types"]["ray.worker.gpu"]["resources"]["GPU"] = "1"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)
