"""Install Detectron2 into the running Python environment (called by scripts/setup.sh).

Detectron2 publishes no wheels on PyPI. Its official install is from source, which compiles its
C++/CUDA ops; we build it at one pinned commit (`OFFICIAL_COMMIT`), never the moving head of its
main branch, against torch's own CUDA: CUDA_HOME is the toolkit whose version matches
``torch.version.cuda`` (an AMI ships several under /usr/local/cuda-X.Y; torch refuses a toolkit
of another major version), with ninja, on every core (MAX_JOBS). When the source cannot be
reached (as on the machines this project is built on), or the build fails, we install FAIR's
detectron2 0.6 *Python* sources from the PyPI sdist ``pb1-detectron2==0.6``, pinned by hash, with
one warning line saying what is then slower or missing. That sdist lacks
``detectron2/layers/csrc``, so it cannot build its extension; ``kfold_ray.detectron2._compat``
supplies what standard Faster R-CNN / RetinaNet / Mask R-CNN / Cascade need instead (see that
module). A ``.pth`` file makes the compat layer active in every process of this environment, Ray
workers included; it does nothing when a compiled ``detectron2._C`` exists. The compiled build
is not exercised by CI (these machines cannot reach GitHub); the fallback is.

Mode (env KFOLD_RAY_DETECTRON2):
    auto        the official source at OFFICIAL_COMMIT if reachable within a few seconds, else the
                PyPI sdist; a failed build falls back to the PyPI sdist (default)
    official    the official source only (fails if unreachable or if the build fails)
    pypi-sdist  the PyPI sdist only
KFOLD_RAY_DETECTRON2_SOURCE: another source for the official build (a mirror's git URL, or a
local checkout), instead of GitHub at OFFICIAL_COMMIT.
--target DIR: install Detectron2 into DIR instead of the environment (its requirements still go
into the environment).
"""

from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
from pathlib import Path

# facebookresearch/detectron2 main on 2026-06-06 (version string 0.6): the newest commit we could
# see; GitHub cannot be reached from the machines CI runs on, so this build is not tested there.
OFFICIAL_COMMIT = "02b5c4e295e990042a714712c21dc79b731e8833"
OFFICIAL_REPO = "https://github.com/facebookresearch/detectron2.git"
OFFICIAL_SOURCE = f"git+{OFFICIAL_REPO}@{OFFICIAL_COMMIT}"
# Compiling the C++/CUDA ops with ninja uses every core; without it they compile one at a time.
BUILD_REQUIREMENTS = ["ninja"]
FALLBACK_WARNING = (
    "warning: the compiled Detectron2 build failed (see above); installed the Python-only build "
    "instead: standard Faster/Mask/Cascade R-CNN and RetinaNet run on torchvision's ops, "
    "deformable convolutions are slower, rotated-box ops are missing")
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


def pip(*args: str, env: dict | None = None) -> None:
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args]
    subprocess.run(cmd, check=True, env=env)


def detectron2_installed(target: str | None = None) -> bool:
    if target:
        return (Path(target) / "detectron2" / "__init__.py").is_file()
    probe = "import importlib.util as u, sys; sys.exit(0 if u.find_spec('detectron2') else 1)"
    return subprocess.run([sys.executable, "-c", probe]).returncode == 0


def official_reachable(source: str, timeout_s: int = 8) -> bool:
    if not source.startswith(("git+", "http://", "https://")):
        return Path(source).exists()  # a local checkout
    url = source.removeprefix("git+").split("@")[0]
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


def cuda_home_for(torch_cuda: str | None, roots: list[str] | None = None) -> str | None:
    """The CUDA toolkit to build with: the one whose version is torch's (``/usr/local/cuda-13.0``
    for CUDA 13.0), else the newest of the same major version; None when torch has no CUDA or
    no such toolkit is installed (a toolkit of another major version cannot build for torch)."""
    if not torch_cuda:
        return None
    if roots is None:
        roots = sorted(glob.glob("/usr/local/cuda-*"))
    by_version = {}
    for root in roots:
        version = Path(root).name.removeprefix("cuda-")
        if (Path(root) / "bin" / "nvcc").exists():
            by_version[version] = root
    if torch_cuda in by_version:
        return by_version[torch_cuda]
    major = torch_cuda.split(".")[0]
    same = [v for v in by_version if v.split(".")[0] == major]
    return by_version[max(same, key=lambda v: tuple(map(int, v.split("."))))] if same else None


def build_env() -> dict:
    """The official build's environment: torch's CUDA toolkit, every core."""
    probe = "import torch; print(torch.version.cuda or '')"
    torch_cuda = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                                check=True).stdout.strip() or None
    env = {**os.environ, "MAX_JOBS": str(os.cpu_count() or 1)}
    home = cuda_home_for(torch_cuda)
    if torch_cuda and home:
        env["CUDA_HOME"] = home
        env["PATH"] = f"{home}/bin{os.pathsep}{env.get('PATH', '')}"
        log(f"building against CUDA {torch_cuda} (torch's) from {home}")
    elif torch_cuda:
        log(f"warning: no CUDA {torch_cuda.split('.')[0]}.x toolkit under /usr/local for torch's "
            f"CUDA {torch_cuda}: the build compiles no CUDA ops (or fails)")
    return env


def install_official(source: str, target: str | None) -> None:
    log(f"installing the official build from {source} (compiles C++/CUDA ops: several minutes)")
    pip("install", *BUILD_REQUIREMENTS, *RUNTIME_REQUIREMENTS)
    pip("install", "--no-build-isolation", "--no-deps", *_target(target), source, env=build_env())


def _target(target: str | None) -> list[str]:
    return ["--target", target] if target else []


def install_from_pypi_sdist(target: str | None = None) -> None:
    log("installing detectron2 0.6 Python sources from the PyPI sdist")
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
        pip("install", "--no-deps", "--no-build-isolation", *_target(target), str(build))


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


def install_compat_pth(target: str | None = None) -> None:
    """Activate kfold_ray's compat layer at every interpreter start of this environment."""
    site = Path(target) if target else Path(sysconfig.get_paths()["purelib"])
    (site / PTH_NAME).write_text(PTH_LINE)
    log(f"compat hook installed: {site / PTH_NAME}")


def has_compiled_ops(target: str | None = None) -> bool:
    if target:
        return any((Path(target) / "detectron2").glob("_C*.so"))
    probe = (
        "import importlib.util as u, sys; s = u.find_spec('detectron2._C');"
        "sys.exit(0 if s and s.origin and not s.origin.endswith('.py') else 1)"
    )
    return subprocess.run([sys.executable, "-c", probe]).returncode == 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default=None, help="install Detectron2 into this folder")
    target = parser.parse_args(argv).target
    mode = os.environ.get("KFOLD_RAY_DETECTRON2", "auto")
    source = os.environ.get("KFOLD_RAY_DETECTRON2_SOURCE") or OFFICIAL_SOURCE
    if mode not in {"auto", "official", "pypi-sdist"}:
        log(f"KFOLD_RAY_DETECTRON2={mode!r}: expected auto, official or pypi-sdist")
        return 2
    if detectron2_installed(target):
        log("detectron2 already installed")
    elif mode == "official" or (mode == "auto" and official_reachable(source)):
        try:
            install_official(source, target)
        except subprocess.CalledProcessError:
            if mode == "official":
                log("the official build failed (KFOLD_RAY_DETECTRON2=official: no fallback)")
                return 1
            log(FALLBACK_WARNING)
            install_from_pypi_sdist(target)
    else:
        log("the official source is unreachable")
        install_from_pypi_sdist(target)
    if not has_compiled_ops(target):
        install_compat_pth(target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
