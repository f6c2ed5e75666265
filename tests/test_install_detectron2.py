"""Node set-up's Detectron2 install (scripts/install_detectron2.py): a pinned source, torch's own
CUDA toolkit, and the Python-only build when the compiled one fails.

The compiled build itself needs GitHub (unreachable here) and a CUDA toolkit: a deliberately
broken local source stands in for a build that fails, as one does on a node whose toolkit does
not fit; the fallback is then the real PyPI install, into a folder of the test's own.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "install_detectron2.py"


def _script():
    spec = importlib.util.spec_from_file_location("install_detectron2", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_official_source_is_pinned_to_a_commit():
    script = _script()
    assert script.OFFICIAL_COMMIT == "02b5c4e295e990042a714712c21dc79b731e8833"
    assert script.OFFICIAL_SOURCE.endswith("detectron2.git@" + script.OFFICIAL_COMMIT)
    assert "ninja" in script.BUILD_REQUIREMENTS


def test_the_cuda_toolkit_is_the_one_torch_was_built_for(tmp_path):
    cuda_home_for = _script().cuda_home_for
    roots = []
    for version in ("12.8", "12.9", "13.0", "13.2"):  # the DLAMI's toolkits
        (tmp_path / f"cuda-{version}" / "bin").mkdir(parents=True)
        (tmp_path / f"cuda-{version}" / "bin" / "nvcc").touch()
        roots.append(str(tmp_path / f"cuda-{version}"))
    assert cuda_home_for("13.0", roots) == str(tmp_path / "cuda-13.0")  # not the default 13.2
    assert cuda_home_for("12.6", roots) == str(tmp_path / "cuda-12.9")  # the newest 12.x
    assert cuda_home_for("11.8", roots) is None  # another major version cannot build for torch
    assert cuda_home_for(None, roots) is None  # a CPU-only torch


def _broken_source(tmp_path: Path) -> Path:
    source = tmp_path / "detectron2-broken"
    source.mkdir()
    (source / "setup.py").write_text(
        "import sys\n"
        "sys.exit('error: command /usr/local/cuda/bin/nvcc failed with exit code 1 "
        "(a deliberately broken source)')\n")
    return source


def _install(tmp_path: Path, mode: str) -> tuple[subprocess.CompletedProcess, Path]:
    target = tmp_path / "site"
    env = {**os.environ, "KFOLD_RAY_DETECTRON2": mode,
           "KFOLD_RAY_DETECTRON2_SOURCE": str(_broken_source(tmp_path)),
           "PIP_CONSTRAINT": str(ROOT / "constraints.txt")}
    done = subprocess.run([sys.executable, str(SCRIPT), "--target", str(target)], env=env,
                          capture_output=True, text=True, timeout=900)
    return done, target


@pytest.mark.slow
def test_a_failed_build_falls_back_to_the_python_only_build_with_a_warning(tmp_path):
    done, target = _install(tmp_path, "auto")
    assert done.returncode == 0, done.stderr[-3000:]
    assert _script().FALLBACK_WARNING in done.stderr
    assert (target / "detectron2" / "__init__.py").is_file()
    assert not list((target / "detectron2").glob("_C*.so"))  # the Python-only build
    assert (target / _script().PTH_NAME).is_file()  # with the compat layer's hook


def test_official_mode_does_not_fall_back(tmp_path):
    done, target = _install(tmp_path, "official")
    assert done.returncode == 1
    assert "the official build failed (KFOLD_RAY_DETECTRON2=official: no fallback)" in done.stderr
    assert not (target / "detectron2").exists()
