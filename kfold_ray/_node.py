"""What this node has: torch and its CUDA build, the NVIDIA driver, the GPUs, Detectron2's build.

A fold that reserved GPUs must train on them: when CUDA cannot be used in its process,
`fold_device` stops it with one line that names the node, the driver, torch's CUDA and the fix,
instead of training on the CPU for days. `describe_node` is what ``kfold-ray doctor`` reports
for every node and what ``setup.sh --node`` checks when it ends. Only the standard library at
import; torch is imported when asked.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
from dataclasses import asdict, dataclass

from ._exceptions import NodeSetupError, one_line

__all__ = ["NodeReport", "cuda_problem", "describe_node", "driver_version", "fold_device",
           "min_driver_for", "node_name"]

# The oldest Linux NVIDIA driver each CUDA major version runs on (NVIDIA's CUDA toolkit release
# notes, "minor version compatibility"): torch's CUDA 13.0 wheels need >= 580, CUDA 12.x >= 525.
MIN_DRIVER = {13: 580, 12: 525, 11: 450}


def node_name() -> str:
    """``host (ip)``, as fold logs, errors and metrics.json name a node (the IP is Ray's)."""
    try:
        import ray

        return f"{socket.gethostname()} ({ray.util.get_node_ip_address()})"
    except Exception:  # noqa: BLE001 - only for messages
        return socket.gethostname()


def driver_version() -> str | None:
    """The NVIDIA kernel driver's version (``580.65.06``), or None when there is none."""
    try:
        with open("/proc/driver/nvidia/version", encoding="utf-8") as f:
            found = re.search(r"Kernel Module\s+(?:for \S+\s+)?([\d.]+)", f.read())
        if found:
            return found.group(1)
    except OSError:
        pass
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20).stdout.split()
            return out[0] if out else None
        except (OSError, subprocess.SubprocessError):
            return None
    return None


def min_driver_for(cuda: str | None) -> int | None:
    """The oldest driver major version torch's CUDA build ``cuda`` (``"13.0"``) runs on."""
    if not cuda:
        return None
    return MIN_DRIVER.get(int(cuda.split(".")[0]))


def cuda_problem() -> str | None:
    """Why CUDA cannot be used in this process, or None when it can."""
    import torch

    if torch.cuda.is_available():
        return None
    built_for = torch.version.cuda
    driver = driver_version()
    if not built_for:
        return (f"torch {torch.__version__} is a CPU-only build (no CUDA); install a CUDA build "
                "of torch on this node (scripts/setup.sh --node does)")
    need = min_driver_for(built_for)
    reason = _cuda_init_error(torch)
    has = f"NVIDIA driver {driver}" if driver else "no NVIDIA driver"
    fix = (f"install an NVIDIA driver >= {need} (or a torch build for this node's CUDA)" if need
           else "install a driver that supports it")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    seen = f"; CUDA_VISIBLE_DEVICES={visible!r}" if visible is not None else ""
    return (f"CUDA is not usable ({reason}): {has}, torch {torch.__version__} built for CUDA "
            f"{built_for}{seen}; fix: {fix}, or on a cluster without GPUs pass --gpus-per-fold 0")


def _cuda_init_error(torch) -> str:
    try:
        torch.cuda.init()
    except Exception as e:  # noqa: BLE001 - only for the message
        return one_line(e).split(". ")[0][:200]  # torch's first sentence says it
    return "torch.cuda.is_available() is False"


def fold_device(num_gpus: float) -> str:
    """The device a fold's process trains on: ``cpu`` when it reserved no GPU; ``cuda`` when it
    reserved GPUs and CUDA works; else NodeSetupError (a fold that reserved GPUs never crawls
    on the CPU)."""
    if not num_gpus:
        return "cpu"
    problem = cuda_problem()
    if problem:
        raise NodeSetupError(node_name(), f"a fold reserved {num_gpus:g} GPU here, but {problem}")
    return "cuda"


@dataclass(frozen=True)
class NodeReport:
    """One node as ``kfold-ray doctor`` shows it."""

    node: str
    cpus: int
    torch: str
    torch_cuda: str | None
    driver: str | None
    gpus_seen_by_torch: int
    cuda_problem: str | None
    detectron2: str  # "compiled", "python-only (compat layer)" or "missing: <why>"
    storage: str | None  # None: not checked; "ok" or why not

    def to_json(self) -> dict:
        return asdict(self)


def describe_node(storage_uri: str | None = None) -> NodeReport:
    """This node's torch, CUDA, driver, GPUs, Detectron2 build, CPUs and (with ``storage_uri``)
    whether it reaches the run's storage."""
    import torch

    return NodeReport(
        node=node_name(), cpus=os.cpu_count() or 0, torch=torch.__version__,
        torch_cuda=torch.version.cuda, driver=driver_version(),
        gpus_seen_by_torch=torch.cuda.device_count() if torch.cuda.is_available() else 0,
        cuda_problem=cuda_problem(),
        detectron2=detectron2_build(), storage=_storage_check(storage_uri),
    )


def detectron2_build() -> str:
    """How Detectron2 is installed here: compiled ops, or the Python-only build with kfold-ray's
    compat layer (slower deformable convs; rotated-box ops unavailable)."""
    import importlib.util

    spec = importlib.util.find_spec("detectron2")
    if spec is None or not spec.submodule_search_locations:
        return "missing: detectron2 is not installed (bash scripts/setup.sh --node)"
    folder = next(iter(spec.submodule_search_locations))
    compiled = any(name.startswith("_C") and name.endswith((".so", ".pyd"))
                   for name in os.listdir(folder))
    return "compiled" if compiled else "python-only (compat layer)"


def _storage_check(uri: str | None) -> str | None:
    if uri is None:
        return None
    from .storage._storage import Storage

    try:
        Storage(uri).check_usable()
    except Exception as e:  # noqa: BLE001 - any failure is what the report shows
        return one_line(e)[:300]
    return "ok"


NVIDIA_PCI_VENDOR = "0x10de"


def nvidia_devices(sys_root: str = "/sys") -> int:
    """NVIDIA PCI devices on this machine (GPUs, whether or not a driver is loaded)."""
    import glob

    count = 0
    for vendor in glob.glob(os.path.join(sys_root, "bus", "pci", "devices", "*", "vendor")):
        try:
            with open(vendor, encoding="ascii") as f:
                if f.read().strip().lower() == NVIDIA_PCI_VENDOR:
                    count += 1
        except OSError:
            continue
    return count


def check_this_node(sys_root: str = "/sys") -> int:
    """What ``scripts/setup.sh --node`` ends with: one line on this node; exit status 1 when it
    has NVIDIA GPUs that torch cannot use (no driver, a driver too old for torch's CUDA, a
    CPU-only torch), so a broken GPU node fails its set-up instead of training on the CPU."""
    import sys

    devices = nvidia_devices(sys_root)
    if not devices:
        print(f"[setup] {node_name()}: no NVIDIA GPU on this node (a CPU node)", file=sys.stderr)
        return 0
    problem = cuda_problem()
    if problem:
        print(f"[setup] error: {node_name()} has {devices} NVIDIA GPU device(s), but {problem}",
              file=sys.stderr)
        return 1
    import torch

    print(f"[setup] {node_name()}: torch {torch.__version__} sees {torch.cuda.device_count()} "
          f"GPU(s), NVIDIA driver {driver_version()}", file=sys.stderr)
    return 0
