"""A fold's Ray metrics: what the Ray dashboard's Metrics view charts (through Prometheus) and
what each node's metrics endpoint serves while the fold runs.

Ray serves an application metric registered as ``name`` under ``ray_<name>``; `SERVED` lists
the names as served (the README's Progress section names them so; a test scrapes a node's
endpoint during a run and compares):

    ray_kfold_ray_train_iteration             training iteration                   run, fold
    ray_kfold_ray_train_loss                  total training loss                  run, fold
    ray_kfold_ray_images_predicted            held-out images predicted            run, fold
    ray_kfold_ray_predict_images_per_second   held-out images/s, last ~10 s        run, fold
    ray_kfold_ray_gpu_utilization             % of time the GPU was busy (NVML,    run, fold, gpu
                                              as nvidia-smi's "GPU-Util"); GPU folds only

Ray 2.60 exports a gauge only in the report interval in which it was set (checked here: a gauge
set once is served for one interval, then gone), so a fold whose step takes longer than that, or
that waits, would vanish from the charts: every value is set again every REFRESH_S by a thread of
the process, until `close`.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Any, Sequence

from ray.util import metrics

from .._backend import Progress

log = logging.getLogger(__name__)

PREFIX = "ray_"  # what Ray's metrics exporter puts before every application metric
_TAGS = ("run", "fold")
# Seconds of prediction progress the images/s gauge averages over.
RATE_WINDOW_S = 10.0
# Every gauge is set again this often (Ray's default report interval is 10 s).
REFRESH_S = 2.0

# Registered name -> description.
FOLD_METRICS = {
    "kfold_ray_train_iteration": "training iteration of a fold",
    "kfold_ray_train_loss": "total training loss of a fold",
    "kfold_ray_images_predicted": "held-out images predicted",
    "kfold_ray_predict_images_per_second": "held-out images predicted per second (last ~10 s)",
}
GPU_METRIC = "kfold_ray_gpu_utilization"
SERVED = tuple(PREFIX + name for name in (*FOLD_METRICS, GPU_METRIC))


class FoldMetrics:
    """The gauges of one fold, set from its `Progress` events (and, with GPUs, NVML)."""

    def __init__(self, run: str, fold: int, gpu_ids: Sequence[Any] = ()) -> None:
        self.tags = {"run": run, "fold": str(fold)}
        self._gauges = {name: metrics.Gauge(name, text, tag_keys=_TAGS)
                        for name, text in FOLD_METRICS.items()}
        self._values: dict[str, float] = {}
        self._predict_steps: collections.deque[tuple[float, int]] = collections.deque()
        self._lock = threading.Lock()
        self.gpus = GpuUtilization(run, fold, gpu_ids) if gpu_ids else None
        self._stop = every(REFRESH_S, self.refresh)

    def record(self, event: Progress) -> None:
        with self._lock:
            if event.stage == "train":
                self._set("kfold_ray_train_iteration", event.step)
                if event.loss is not None:
                    self._set("kfold_ray_train_loss", event.loss)
            else:
                self._set("kfold_ray_images_predicted", event.step)
                self._set_rate(event.step)

    def refresh(self) -> None:
        """Set every gauge again (the images/s falls while no batch comes)."""
        with self._lock:
            if self._predict_steps:
                self._set_rate(self._predict_steps[-1][1])
            for name, value in self._values.items():
                self._gauges[name].set(value, tags=self.tags)
        if self.gpus is not None:
            self.gpus.sample()

    def close(self) -> None:
        self._stop.set()

    def _set(self, name: str, value: float) -> None:
        self._values[name] = float(value)
        self._gauges[name].set(float(value), tags=self.tags)

    def _set_rate(self, step: int) -> None:
        rate = images_per_second(self._predict_steps, step, time.monotonic())
        if rate is not None:
            self._set("kfold_ray_predict_images_per_second", rate)


def images_per_second(steps: collections.deque[tuple[float, int]], step: int,
                      now: float) -> float | None:
    """Images/s from the last point at least RATE_WINDOW_S old (``steps``: (time, images done)
    so far, updated here) to (``now``, ``step``); None until there are two points."""
    if steps and step < steps[-1][1]:  # predicting again (a halved batch): a new series
        steps.clear()
    steps.append((now, step))
    while len(steps) > 2 and now - steps[1][0] >= RATE_WINDOW_S:
        steps.popleft()
    (t0, s0), (t1, s1) = steps[0], steps[-1]
    return (s1 - s0) / (t1 - t0) if t1 > t0 else None


class GpuUtilization:
    """The busy % of this process's GPUs (Ray's GPU ids), read through NVML and set as a gauge.

    NVML comes from nvidia-ml-py when it is installed, else from the copy Ray ships for its own
    GPU metrics. A GPU fold whose GPUs NVML cannot read says so in one line and goes on without
    the gauge. `start` samples every REFRESH_S in a thread of its own (a fold's Train workers,
    which have no `FoldMetrics`).
    """

    def __init__(self, run: str, fold: int, gpu_ids: Sequence[Any]) -> None:
        self.tags = {"run": run, "fold": str(fold)}
        self.gauge = metrics.Gauge(GPU_METRIC, "% of time the fold's GPU was busy (NVML)",
                                   tag_keys=(*_TAGS, "gpu"))
        self._nvml, self._handles = None, {}
        try:
            self._nvml = _nvml()
            self._nvml.nvmlInit()
            self._handles = {str(g): _handle(self._nvml, g) for g in gpu_ids}
        except Exception as e:  # noqa: BLE001 - no driver, no library: the metric is off
            log.warning("kfold-ray fold %d: no GPU utilisation metric (NVML: %s: %s)",
                        fold, type(e).__name__, str(e)[:200])
            self._handles = {}

    def sample(self) -> None:
        for gpu, handle in self._handles.items():
            busy = self._nvml.nvmlDeviceGetUtilizationRates(handle).gpu
            self.gauge.set(float(busy), tags={**self.tags, "gpu": gpu})

    def start(self) -> threading.Event:
        """Sample every REFRESH_S until the returned event is set."""
        return every(REFRESH_S, self.sample)


def every(seconds: float, work) -> threading.Event:
    """Call ``work()`` every ``seconds`` in a daemon thread until the returned event is set; an
    error stops the thread with one warning (metrics never fail a fold)."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(seconds):
            try:
                work()
            except Exception as e:  # noqa: BLE001
                log.warning("kfold-ray: metrics thread stopped (%s: %s)", type(e).__name__, e)
                return

    threading.Thread(target=loop, name="kfold-ray-metrics", daemon=True).start()
    return stop


def _nvml():
    try:
        import pynvml  # nvidia-ml-py
    except ImportError:
        from ray._private.thirdparty import pynvml
    return pynvml


def _handle(nvml, gpu_id: Any):
    """NVML's handle of a GPU as Ray names it: its index on the node, or its UUID."""
    text = str(gpu_id)
    if text.isdigit():
        return nvml.nvmlDeviceGetHandleByIndex(int(text))
    return nvml.nvmlDeviceGetHandleByUUID(text)
