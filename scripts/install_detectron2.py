"""Install Detectron2 into the running Python environment (called by scripts/setup.sh).

Detectron2 publishes no wheels on PyPI. Its official install is from source:

    pip install --no-build-isolation 'git+https://github.com/facebookresearch/detectron2.git'

which compiles its C++/CUDA ops. Where that source cannot be reached (as on the machines this
project is built on), we install FAIR's detectron2 0.6 *Python* sources from the PyPI sdist
``pb1-detectron2==0.6``, pinned by hash. That sdist lacks ``detectron2/layers/csrc``, so it cannot
build its extension; ``kfold_ray.detectron2._compat`` supplies what standard Faster R-CNN / RetinaNet need
instead (see that module). A ``.pth`` file makes the compat layer active in every process of this
environment, Ray workers included; it does nothing when a compiled ``detectron2._C`` exists.

Mode (env KFOLD_RAY_DETECTRON2):
    auto        official source if reachable within a few seconds, else the PyPI sdist (default)
    official    official source only (fails if unreachable)
    pypi-sdist  the PyPI sdist only
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
from pathlib import Path

OFFICIAL_SOURCE = "git+https://github.com/facebookresearch/detectron2.git"
SDIST_REQUIREMENT = (
    "pb1-detectron2==0.6 "
    "--hash=sha256:5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29"
)
# Detectron2 0.6's own install_requires, minus black (a formatter it pins to a 2021 release and
# never needs at run time) and future/pydot (caffe2 export only). setuptools<81 keeps
# pkg_resources, which detectron2 0.6 imports; tensorboard is DefaultTrainer's event writer.
RUNTIME_REQUIREMENTS = [
    "Pillow>=7.1",
    "matplotlib",
    "pycocotools>=2.0.2",
    "termcolor>=1.1",
    "yacs>=0.1.8",
    "tabulate",
    "cloudpickle",
    "tqdm>4.29.0",
    "tensorboard",
    "fvcore>=0.1.5,<0.1.6",
    "iopath>=0.1.7,<0.1.10",
    "omegaconf>=2.1",
    "hydra-core>=1.1",
    "setuptools<81",
]
PTH_NAME = "kfold_ray_detectron2_compat.pth"
# One line, run at every interpreter start: loads kfold_ray/detectron2/_compat.py by itself (without
# importing the kfold_ray package and numpy with it) and installs its import hook. Never fails
# the interpreter's start and prints nothing: a missing or moved kfold_ray only leaves the hook out.
COMPAT_FILE = ("detectron2", "_compat.py")  # inside the kfold_ray package folder
PTH_LINE = (
    "import os, importlib.util as _u; _s = _u.find_spec('kfold_ray'); "
    "_p = _s and _s.submodule_search_locations and os.path.join("
    f"_s.submodule_search_locations[0], *{COMPAT_FILE!r}); "
    "_f = _p and os.path.isfile(_p) and _u.spec_from_file_location('_kfold_ray_d2compat', _p); "
    "_m = _f and _u.module_from_spec(_f); _f and _f.loader.exec_module(_m); "
    "_m and _m.install_import_hook()\n"
)


def log(msg: str) -> None:
    print(f"[install_detectron2] {msg}", file=sys.stderr, flush=True)


def pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args]
    subprocess.run(cmd, check=True)


def detectron2_installed() -> bool:
    probe = "import importlib.util as u, sys; sys.exit(0 if u.find_spec('detectron2') else 1)"
    return subprocess.run([sys.executable, "-c", probe]).returncode == 0


def official_reachable(timeout_s: int = 8) -> bool:
    url = OFFICIAL_SOURCE.removeprefix("git+")
    try:
        result = subprocess.run(
            ["git", "ls-remote", "--heads", url],
            capture_output=True,
            timeout=timeout_s,
            env={**os.environ, "GIT_TERMINAL_PROMPT": "0"},
        )
    except (subprocess.TimeoutExpired, FileNotFoundError):
        return False
    return result.returncode == 0


def install_official() -> None:
    log("installing the official build from source (compiles C++/CUDA ops: several minutes)")
    pip("install", "--no-build-isolation", OFFICIAL_SOURCE)


def install_from_pypi_sdist() -> None:
    log("official source unreachable: installing detectron2 0.6 Python sources from PyPI sdist")
    pip("install", *RUNTIME_REQUIREMENTS)
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        reqs = tmp_path / "requirements.txt"
        reqs.write_text(SDIST_REQUIREMENT + "\n")
        # The sdist's setup.py imports torch to prepare metadata, hence no build isolation.
        pip("download", "--no-deps", "--no-binary", ":all:", "--no-build-isolation",
            "--require-hashes", "-r", str(reqs), "-d", str(tmp_path / "dl"))
        (sdist,) = (tmp_path / "dl").glob("*.tar.gz")
        build = tmp_path / "build"
        _extract_python_package(sdist, build)
        _write_build_files(build)
        pip("install", "--no-deps", "--no-build-isolation", str(build))


def _extract_python_package(sdist: Path, build: Path) -> None:
    """Take only the ``detectron2`` package (Python files and model-zoo configs) from the sdist."""
    build.mkdir()
    with tarfile.open(sdist) as tar:
        members = []
        for m in tar.getmembers():
            parts = Path(m.name).parts
            if len(parts) > 1 and parts[1] == "detectron2" and (m.isfile() or m.isdir()):
                m.name = str(Path(*parts[1:]))
                members.append(m)
        tar.extractall(build, members=members, filter="data")


def _write_build_files(build: Path) -> None:
    (build / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=64"]\nbuild-backend = "setuptools.build_meta"\n\n'
        '[project]\nname = "detectron2"\nversion = "0.6+pysrc"\n'
        'description = "FAIR detectron2 0.6 Python sources (from pb1-detectron2 sdist), no C ops"\n'
        f"dependencies = {RUNTIME_REQUIREMENTS!r}\n\n".replace("'", '"')
        + '[tool.setuptools.packages.find]\ninclude = ["detectron2*"]\n\n'
        '[tool.setuptools.package-data]\n"*" = ["*.yaml", "**/*.yaml", "*.py"]\n'
    )


def install_compat_pth() -> None:
    """Activate kfold_ray's compat layer at every interpreter start of this environment."""
    site = Path(sysconfig.get_paths()["purelib"])
    (site / PTH_NAME).write_text(PTH_LINE)
    log(f"compat hook installed: {site / PTH_NAME}")


def has_compiled_ops() -> bool:
    probe = (
        "import importlib.util as u, sys; s = u.find_spec('detectron2._C');"
        "sys.exit(0 if s and s.origin and not s.origin.endswith('.py') else 1)"
    )
    return subprocess.run([sys.executable, "-c", probe]).returncode == 0


def main() -> int:
    mode = os.environ.get("KFOLD_RAY_DETECTRON2", "auto")
    if mode not in {"auto", "official", "pypi-sdist"}:
        log(f"KFOLD_RAY_DETECTRON2={mode!r}: expected auto, official or pypi-sdist")
        return 2
    if detectron2_installed():
        log("detectron2 already installed")
    elif mode == "official" or (mode == "auto" and official_reachable()):
        install_official()
    else:
        install_from_pypi_sdist()
    if not has_compiled_ops():
        install_compat_pth()
    return 0


if __name__ == "__main__":
    sys.exit(main())
