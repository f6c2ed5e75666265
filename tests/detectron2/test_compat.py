"""The Detectron2 compat layer (kfold_ray/detectron2/_compat.py) is active in every process of the
environment the set-up made, Ray workers included, before anything imports kfold_ray.

scripts/install_detectron2.py writes a one-line ``.pth`` that loads the layer by its path inside
the kfold_ray package folder: a test here sees it if the file moves and the line does not follow.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
COMPAT = ROOT / "kfold_ray" / "detectron2" / "_compat.py"


def _install_script():
    spec = importlib.util.spec_from_file_location("install_detectron2", ROOT / "scripts" / "install_detectron2.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _finders_after_the_pth(tmp_path: Path, package_root: Path) -> subprocess.CompletedProcess:
    """A bare interpreter (no site) that processes only our .pth, with ``package_root`` first on
    its path; it prints the import hooks it ends up with."""
    site_dir = tmp_path / "site"
    site_dir.mkdir()
    script = _install_script()
    (site_dir / script.PTH_NAME).write_text(script.PTH_LINE)
    code = ("import site, sys; site.addsitedir(sys.argv[1]); "
            "print(sorted(type(f).__name__ for f in sys.meta_path)); "
            "print('kfold_ray' in sys.modules, 'numpy' in sys.modules)")
    env = {**os.environ, "PYTHONPATH": str(package_root)}
    # cwd: not the project root, whose kfold_ray/ a -c script would find first on its path.
    return subprocess.run([sys.executable, "-S", "-c", code, str(site_dir)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)


def test_the_pth_line_loads_the_layer_from_where_it_lives(tmp_path):
    assert COMPAT.is_file()
    done = _finders_after_the_pth(tmp_path, ROOT)
    assert done.returncode == 0 and done.stderr == ""
    finders, imported = done.stdout.splitlines()
    assert "_Detectron2CompatFinder" in finders
    assert imported == "False False", "the .pth must not import kfold_ray (nor numpy with it)"


def test_the_pth_line_is_silent_when_the_layer_is_not_there(tmp_path):
    elsewhere = tmp_path / "old" / "kfold_ray"
    elsewhere.mkdir(parents=True)
    (elsewhere / "__init__.py").write_text("")
    done = _finders_after_the_pth(tmp_path, elsewhere.parent)
    assert done.returncode == 0
    assert done.stderr == "", "a missing layer must not print a traceback at every start"
    assert "_Detectron2CompatFinder" not in done.stdout


def test_the_environment_holds_the_set_ups_pth():
    """The venv's .pth is the one today's script writes (a stale one from before a move would
    point at a file that is gone); with a compiled Detectron2 there is none to write."""
    script = _install_script()
    pth = Path(sysconfig.get_paths()["purelib"]) / script.PTH_NAME
    if script.has_compiled_ops():
        assert not pth.exists()
    else:
        assert pth.read_text() == script.PTH_LINE


def test_the_layer_is_active_in_a_ray_worker(ray_local):
    import ray

    @ray.remote
    def inside_a_worker():
        hooks = [f for f in sys.meta_path if type(f).__name__ == "_Detectron2CompatFinder"]
        # The .pth loads the layer without entering it in sys.modules: its file is its code's.
        layer_file = hooks[0].find_spec.__code__.co_filename if hooks else None
        imported_kfold_ray = "kfold_ray" in sys.modules
        import detectron2._C  # noqa: F401  (the stand-in without compiled ops)
        from PIL import Image

        return len(hooks), layer_file, imported_kfold_ray, hasattr(Image, "LINEAR")

    hooks, layer_file, imported_kfold_ray, has_linear = ray.get(inside_a_worker.remote())
    if _install_script().has_compiled_ops():
        pytest.fail("this test is written for the Python-only Detectron2 build that CI installs")
    assert hooks == 1
    assert Path(layer_file).resolve() == COMPAT.resolve()
    assert not imported_kfold_ray  # active before kfold_ray is imported
    assert has_linear
