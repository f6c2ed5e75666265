"""Test-only permit for fake GPUs: a fold that reserved a GPU Ray only pretends to have trains
on the CPU (the product itself stops such a fold: kfold_ray._node.fold_device).

Every Python process whose PYTHONPATH holds this folder imports this file at start (Python's
``sitecustomize``): tests/conftest.py puts it on the PYTHONPATH that pytest's Ray workers, the
``ray start`` nodes of tests/clusters.py and the fake autoscaler's nodes inherit. The product
reads no option or variable for it: a process without this folder on its path gets the real
check. Only the standard library here: it runs in every interpreter of a test, Ray's included.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys

TARGET = "kfold_ray._node"


def permit(module) -> None:
    """Wrap ``module.fold_device``: a GPU that CUDA cannot use means a fake one: the CPU."""
    real = module.fold_device
    if getattr(real, "fake_gpu_permit", False):
        return

    def fold_device(num_gpus: float) -> str:
        if num_gpus and module.cuda_problem():
            return "cpu"
        return real(num_gpus)

    fold_device.fake_gpu_permit = True
    module.fold_device = fold_device


class _PermitFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            permit(module)

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    if TARGET in sys.modules:
        permit(sys.modules[TARGET])
    elif not any(isinstance(f, _PermitFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _PermitFinder())


install()
