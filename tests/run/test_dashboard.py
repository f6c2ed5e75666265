"""What a user watching a run sees: the Ray dashboard (in headless Chromium, past its auth token),
each node's metrics endpoint, and a real Prometheus scraping it (Debian's `prometheus`, the server
`ray metrics launch-prometheus` downloads on a cluster), all during one run.

One `ray start --head` cluster with token auth and the dashboard on (Ray 2.60's defaults on a
machine with a token), one driver process running `run_cv` with two folds of two Ray Train
workers each (tests/fakes.py's EchoBackend: this is about what the dashboard shows, not about
training); every fold holds at its end, alive, until the last test lets it finish.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from clusters import RayCluster, free_port, log_tail, make_token_home
from fakes import wait_for

from kfold_ray.run._fold_metrics import GPU_METRIC, PREFIX, SERVED

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOTS = ROOT / "runs"  # git-ignored
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]
PROMETHEUS = "/usr/bin/prometheus"
FOLDS, WORKERS = 2, 2
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))

DRIVER = r"""
import sys
from pathlib import Path
from cocofactory import make_coco
from fakes import EchoBackend
from kfold_ray import run_cv
base, folds, workers = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
ann, images = make_coco(base / "data", n_images=12, categories=2, size=(64, 64))
run_cv(ann, folds, image_root=images, gpus_per_fold=0, workers_per_fold=workers,
       cpus_per_fold=0.5, run_dir=base / "run", batch_size=2, progress=True,
       backend=EchoBackend(control_dir=str(base / "control"), hold_at_end=True, step_s=0.5))
print("RUN FINISHED", flush=True)
"""


def _missing(path: str, package: str) -> None:
    if not Path(path).exists():  # CI must have it (scripts/setup.sh installs it): a failure there
        (pytest.fail if os.environ.get("CI") else pytest.skip)(
            f"{path} is missing (apt-get install {package}; scripts/setup.sh does)")


@dataclass
class LiveRun:
    cluster: RayCluster
    driver: subprocess.Popen
    base: Path
    log: Path
    run_name: str

    @property
    def token(self) -> str:
        return self.cluster.token

    @property
    def session(self) -> Path:
        return self.cluster.temp_dir / "ray" / "session_latest"

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    @property
    def dashboard_url(self) -> str:
        found = re.search(r"Ray dashboard: (http://\S+)", self.output())
        assert found, f"the run printed no dashboard URL:\n{self.output()[-2000:]}"
        return found.group(1)

    def api(self, path: str, token: str | None = "same"):
        """(status, body) of a GET on the dashboard, with the cluster's token unless None."""
        headers = {"Authorization": f"Bearer {self.token if token == 'same' else token}"} if token else {}
        request = urllib.request.Request(self.dashboard_url + path, headers=headers)
        try:
            with NO_PROXY.open(request, timeout=30) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode(errors="replace")

    def actor_names(self) -> list[str]:
        return [f"kfold-ray:{self.run_name}:fold{k}:try0" for k in range(FOLDS)]


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    base = tmp_path_factory.mktemp("live")
    (base / "control").mkdir()
    cluster = RayCluster(head_cpus=4, auth_mode="token", home=make_token_home(base / "home"),
                         include_dashboard=True,
                         # metrics reach the endpoint within a second (Ray's default: 10 s)
                         env={"RAY_metrics_report_interval_ms": "1000"})
    driver = None
    try:
        cluster.start()
        log = base / "driver.log"
        with open(log, "wb") as out:
            driver = subprocess.Popen([sys.executable, "-c", DRIVER, str(base), str(FOLDS), str(WORKERS)],
                                      env=cluster.driver_env(address=True), stdout=out,
                                      stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        held = lambda: len(list((base / "control").glob("held_*"))) == FOLDS * WORKERS  # noqa: E731
        wait_for(lambda: held() or driver.poll() is not None, 600, "every fold to hold")
        assert held(), f"the driver exited with {driver.returncode}:\n{log_tail(log, 60)}"
        run_name = json.loads((base / "run" / "run.json").read_text())["run_name"]
        yield LiveRun(cluster, driver, base, log, run_name)
    finally:
        (base / "control" / "release").write_text("")
        if driver is not None and driver.poll() is None:
            try:
                driver.wait(180)
            except subprocess.TimeoutExpired:
                driver.kill()
        cluster.shutdown()


def _served_names(live: LiveRun) -> set[str]:
    """Our metric names on every node's metrics endpoint (the targets Ray gives Prometheus)."""
    discovery = json.loads((live.session / "prom_metrics_service_discovery.json").read_text())
    names = set()
    for target in (t for group in discovery for t in group["targets"]):
        with NO_PROXY.open(f"http://{target}/metrics", timeout=30) as r:
            text = r.read().decode()
        names |= {m.group(1) for m in re.finditer(r"^(ray_kfold_ray_\w+)\{", text, re.M)}
    return names


def test_the_run_prints_the_dashboard_url_which_asks_for_the_token(live):
    output = live.output()
    assert "`ray get-auth-token` prints it" in output, output[-2000:]
    assert live.api("/api/version", token=None)[0] == 401
    assert live.api("/api/version", token="0" * 64)[0] == 403
    status, body = live.api("/api/version")
    assert status == 200 and json.loads(body)["ray_version"], body


def test_the_readme_names_the_metrics_a_node_serves(live):
    readme = (ROOT / "README.md").read_text()
    documented = set(re.findall(r"\b(ray_kfold_ray_\w+)", readme))
    assert documented == set(SERVED) and all(n.startswith(PREFIX) for n in documented)
    on_cpu = documented - {PREFIX + GPU_METRIC}  # no GPU here: no utilisation to chart
    seen: set[str] = set()

    def all_served() -> bool:
        seen.clear()
        seen.update(_served_names(live))
        return seen == on_cpu

    try:
        wait_for(all_served, 60, "every fold metric on the metrics endpoint")
    except AssertionError:
        pass
    assert seen == on_cpu, f"served {sorted(seen)}, documented {sorted(on_cpu)}"


def test_prometheus_scrapes_the_fold_metrics(live, tmp_path):
    _missing(PROMETHEUS, "prometheus")
    # Ray's own Prometheus config for this session (its file_sd targets are the nodes), scraped
    # every second instead of every 10.
    config = (live.session / "metrics" / "prometheus" / "prometheus.yml").read_text()
    assert "prom_metrics_service_discovery.json" in config
    (tmp_path / "prometheus.yml").write_text(re.sub(r"scrape_interval: \d+s", "scrape_interval: 1s", config))
    port = free_port()
    with open(tmp_path / "prometheus.log", "wb") as log:
        server = subprocess.Popen([PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}",
                                   f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                   f"--web.listen-address=127.0.0.1:{port}"],
                                  stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        found: dict[str, float] = {}

        def scraped() -> bool:
            query = "ray_kfold_ray_images_predicted{run=%r}" % live.run_name
            url = f"http://127.0.0.1:{port}/api/v1/query?query={urllib.request.quote(query)}"
            try:
                with NO_PROXY.open(url, timeout=10) as r:
                    result = json.loads(r.read())["data"]["result"]
            except (OSError, KeyError, ValueError):
                return False
            found.update({s["metric"]["fold"]: float(s["value"][1]) for s in result})
            return len(found) == FOLDS

        wait_for(scraped, 90, "Prometheus to scrape both folds")
    finally:
        server.terminate()
        server.wait(30)
    fold_of = json.loads((live.base / "run" / "folds.json").read_text())["folds"]
    held_out = {str(k): sum(1 for f in fold_of if f == k) for k in range(FOLDS)}
    assert found == {k: float(v) for k, v in held_out.items()}, (found, held_out)


def test_the_dashboard_lists_every_fold_actor_in_chromium(live):
    _missing(CHROMIUM, "chromium")
    from playwright import sync_api as playwright

    SCREENSHOTS.mkdir(exist_ok=True)
    url = live.dashboard_url
    names = live.actor_names()
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            # Without the token: Ray 2.60's dashboard asks for it and shows nothing else.
            page = browser.new_page()
            page.goto(url + "/#/actors")
            page.get_by_text("Authentication Token Required").first.wait_for(timeout=60_000)
            assert not any(n in page.inner_text("body") for n in names)
            # With it, as a cookie (what the dashboard's token dialog sets).
            context = browser.new_context(viewport={"width": 1500, "height": 1000})
            context.add_cookies([{"name": "ray-authentication-token", "value": live.token, "url": url}])
            page = context.new_page()
            page.goto(url + "/#/actors")
            page.get_by_text("RayTrainWorker").first.wait_for(timeout=60_000)
            # The actor table shows 10 per page: the fold actors by their name.
            page.get_by_label("Name").first.fill("kfold-ray:")
            for name in names:
                page.get_by_text(name).first.wait_for(timeout=60_000)
            text = page.inner_text("body")
            page.screenshot(path=str(SCREENSHOTS / "dashboard-actors.png"), full_page=True)
        finally:
            browser.close()
    assert all(name in text for name in names), text[:3000]
    assert "ALIVE" in text


def test_each_folds_train_run_and_its_workers_are_in_the_dashboards_train_api(live):
    # Ray 2.60's dashboard pages have no Train view (its routes: overview, jobs, serve, cluster,
    # actors, metrics, logs); the Train runs it records are served by its Train API.
    status, body = live.api("/api/train/v2/runs/v1")
    assert status == 200, body[:500]
    runs = {r["name"]: r for r in json.loads(body)["train_runs"]}
    for k in range(FOLDS):
        run = runs[f"kfold-ray-{live.run_name}-fold{k}-try0"]
        workers = run["attempts"][-1]["workers"]
        assert sorted(w["world_rank"] for w in workers) == list(range(WORKERS)), run
        assert all(w["status"] == "ALIVE" for w in workers), workers


def test_the_run_finishes_once_released(live):
    (live.base / "control" / "release").write_text("")
    assert live.driver.wait(300) == 0, log_tail(live.log, 60)
    assert "RUN FINISHED" in live.output()
