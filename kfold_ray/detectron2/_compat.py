"""Compatibility layer for Detectron2 0.6 Python sources without compiled ops (see DESIGN.md).

An official Detectron2 build ships a compiled ``detectron2._C``; then this module does nothing.
The Python-only install (scripts/install_detectron2.py, from the PyPI sdist) lacks it, and
Detectron2 0.6 also predates Pillow 10. When no compiled ``_C`` exists, an import hook:

1. makes ``PIL.Image.LINEAR`` exist (an alias of BILINEAR, removed in Pillow 10; detectron2 uses it
   as a default argument at import time), before any detectron2 module runs;
2. provides a stand-in ``detectron2._C``: deformable convolution (plain and modulated) computed by
   torchvision's ``deform_conv2d``; every other op raises an error that says what is missing.

The hook is installed in every interpreter of the environment by a ``.pth`` file (written by the
set-up script), so it holds in Ray workers too; kfold_ray's backend also installs it before it
imports detectron2. Only the standard library is imported at interpreter start.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
from pathlib import Path


def install_import_hook() -> None:
    """Put the hook first on ``sys.meta_path``, once per interpreter.

    The ``.pth`` file loads this module under another name before ``kfold_ray`` exists, so the
    check is by class name, not identity.
    """
    if any(type(f).__name__ == "_Detectron2CompatFinder" for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _Detectron2CompatFinder())


def has_compiled_ops(package_dir: str | Path) -> bool:
    """True when the detectron2 package folder holds a compiled ``_C`` extension."""
    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    return any(p.name.startswith("_C") and p.name.endswith(suffixes) for p in Path(package_dir).iterdir())


class _Detectron2CompatFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname == "detectron2":
            spec = importlib.machinery.PathFinder.find_spec(fullname, path)
            if spec is not None and spec.submodule_search_locations:
                pkg_dir = next(iter(spec.submodule_search_locations))
                if not has_compiled_ops(pkg_dir):
                    _patch_pillow()
            return None  # let the normal machinery import detectron2 itself
        if fullname == "detectron2._C":
            real = importlib.machinery.PathFinder.find_spec(fullname, path)
            if real is not None:
                return None
            return importlib.util.spec_from_loader(fullname, _StandInLoader())
        return None


def _patch_pillow() -> None:
    from PIL import Image

    if not hasattr(Image, "LINEAR"):
        Image.LINEAR = Image.BILINEAR  # type: ignore[attr-defined]


class _StandInLoader(importlib.abc.Loader):
    def create_module(self, spec):
        return _StandInModule(spec.name)

    def exec_module(self, module) -> None:
        module.__file__ = __file__


class _StandInModule(types.ModuleType):
    """``detectron2._C`` for a Python-only install."""

    def __init__(self, name: str) -> None:
        super().__init__(name, __doc__)
        self.deform_conv_forward = _deform_conv_forward
        self.deform_conv_backward_input = _deform_conv_backward_input
        self.deform_conv_backward_filter = _deform_conv_backward_filter
        self.modulated_deform_conv_forward = _modulated_forward
        self.modulated_deform_conv_backward = _modulated_backward
        self.get_compiler_version = lambda: "none (Python-only detectron2, kfold_ray compat layer)"
        self.get_cuda_version = lambda: "none"
        self.has_cuda = lambda: False

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        raise NotImplementedError(
            f"detectron2._C.{name} needs Detectron2's compiled ops, which this Python-only "
            "install lacks (standard Faster R-CNN, RetinaNet and Mask R-CNN do not need them). "
            "Install the official build: KFOLD_RAY_DETECTRON2=official bash scripts/setup.sh"
        )


# ---- deformable convolution via torchvision --------------------------------------------------
# Detectron2's C API passes (kW, kH, dW, dH, padW, padH, dilW, dilH, group, deformable_group, ...)
# and writes into preallocated tensors; torchvision's op takes (stride, padding, dilation) as
# (h, w) pairs and infers groups from the tensor shapes.


def _tv_deform(input, offset, weight, stride, padding, dilation, mask=None, bias=None):
    from torchvision.ops import deform_conv2d

    return deform_conv2d(
        input, offset, weight, bias=bias, stride=stride, padding=padding, dilation=dilation, mask=mask
    )


def _deform_conv_forward(input, weight, offset, output, _columns, _ones, kW, kH, dW, dH,
                         padW, padH, dilW, dilH, group, deformable_group, im2col_step):
    out = _tv_deform(input, offset, weight, (dH, dW), (padH, padW), (dilH, dilW))
    output.resize_(out.shape).copy_(out)


def _deform_grads(input, offset, weight, grad_output, stride, padding, dilation, mask=None):
    import torch

    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(True) for t in (input, offset, weight)]
        m = mask.detach().requires_grad_(True) if mask is not None else None
        out = _tv_deform(*leaves, stride, padding, dilation, mask=m)
        grads = torch.autograd.grad(out, leaves + ([m] if m is not None else []), grad_output)
    return grads


def _deform_conv_backward_input(input, offset, grad_output, grad_input, grad_offset, weight,
                                _columns, kW, kH, dW, dH, padW, padH, dilW, dilH, group,
                                deformable_group, im2col_step):
    g_in, g_off, _ = _deform_grads(input, offset, weight, grad_output, (dH, dW), (padH, padW), (dilH, dilW))
    grad_input.copy_(g_in)
    grad_offset.copy_(g_off)


def _deform_conv_backward_filter(input, offset, grad_output, grad_weight, _columns, _ones, kW, kH,
                                 dW, dH, padW, padH, dilW, dilH, group, deformable_group, scale,
                                 im2col_step):
    # Detectron2 does not pass the filter here. The op is linear in the filter, so its gradient
    # does not depend on the filter's values: zeros of the right shape stand in for it.
    stand_in_weight = grad_weight.new_zeros(grad_weight.shape)
    _, _, g_w = _deform_grads(input, offset, stand_in_weight, grad_output, (dH, dW), (padH, padW),
                              (dilH, dilW))
    grad_weight.add_(g_w * scale)


def _modulated_forward(input, weight, bias, _ones, offset, mask, output, _columns, kH, kW, sH, sW,
                       pH, pW, dH, dW, group, deformable_group, with_bias):
    out = _tv_deform(input, offset, weight, (sH, sW), (pH, pW), (dH, dW), mask=mask,
                     bias=bias if with_bias else None)
    output.resize_(out.shape).copy_(out)


def _modulated_backward(input, weight, bias, _ones, offset, mask, _columns, grad_input,
                        grad_weight, grad_bias, grad_offset, grad_mask, grad_output, kH, kW, sH, sW,
                        pH, pW, dH, dW, group, deformable_group, with_bias):
    g_in, g_off, g_w, g_mask = _deform_grads(input, offset, weight, grad_output, (sH, sW), (pH, pW),
                                             (dH, dW), mask=mask)
    grad_input.copy_(g_in)
    grad_offset.copy_(g_off)
    grad_weight.copy_(g_w)
    grad_mask.copy_(g_mask)
    if with_bias:
        grad_bias.copy_(grad_output.sum(dim=(0, 2, 3)))
