"""What a node has (kfold_ray._node): the device a fold trains on, and set-up's last check."""

from __future__ import annotations

import subprocess
import sys

import pytest
from clusters import base_env

from kfold_ray._node import check_this_node, fold_device, min_driver_for, nvidia_devices


def test_the_oldest_driver_for_torch_s_cuda():
    assert min_driver_for("13.0") == 580 and min_driver_for("12.8") == 525
    assert min_driver_for(None) is None


def test_a_fold_without_gpus_trains_on_the_cpu():
    assert fold_device(0) == "cpu"


def test_a_fold_that_reserved_a_gpu_cuda_cannot_use_stops():
    """In a process without the tests' fake-GPU permit, as a user's fold is."""
    code = ("from kfold_ray._node import fold_device\n"
            "try:\n    fold_device(0.5)\nexcept Exception as e:\n"
            "    print(type(e).__name__, e)\nelse:\n    print('trained on', fold_device(0.5))\n")
    done = subprocess.run([sys.executable, "-c", code], env=base_env(fake_gpu_permit=False),
                          capture_output=True, text=True, timeout=120)
    assert done.stdout.startswith("NodeSetupError node "), done.stdout + done.stderr
    assert "a fold reserved 0.5 GPU here, but CUDA is not usable" in done.stdout
    assert "install an NVIDIA driver >= 580" in done.stdout and "--gpus-per-fold 0" in done.stdout


def _sysfs(tmp_path, vendors):
    for i, vendor in enumerate(vendors):
        device = tmp_path / "bus" / "pci" / "devices" / f"0000:00:0{i}.0"
        device.mkdir(parents=True)
        (device / "vendor").write_text(vendor + "\n")
    return str(tmp_path)


def test_set_up_ends_in_error_on_a_gpu_node_torch_cannot_use(tmp_path, capsys):
    # An NVIDIA device (vendor 0x10de) beside an Intel one, and no driver (this machine).
    root = _sysfs(tmp_path, ["0x8086", "0x10de"])
    assert nvidia_devices(root) == 1
    assert check_this_node(root) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has 1 NVIDIA GPU device(s), but CUDA is not usable" in err[0]


def test_set_up_passes_on_a_cpu_node(tmp_path, capsys):
    assert check_this_node(_sysfs(tmp_path, ["0x8086"])) == 0
    assert "no NVIDIA GPU on this node" in capsys.readouterr().err


@pytest.mark.parametrize("vendor", ["0x10DE", "0x10de"])
def test_vendor_ids_are_read_in_either_case(tmp_path, vendor):
    assert nvidia_devices(_sysfs(tmp_path, [vendor])) == 1
