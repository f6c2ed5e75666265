"""A fold's Ray metrics: the images/s gauge's arithmetic and the names served (the names are
checked against a real metrics endpoint and Prometheus in test_dashboard.py)."""

from __future__ import annotations

import collections

import pytest

from kfold_ray.run._fold_metrics import (
    FOLD_METRICS,
    GPU_METRIC,
    PREFIX,
    RATE_WINDOW_S,
    SERVED,
    images_per_second,
)


def test_images_per_second_over_the_last_window():
    steps: collections.deque = collections.deque()
    assert images_per_second(steps, 8, 100.0) is None  # one point: no rate yet
    assert images_per_second(steps, 16, 101.0) == pytest.approx(8.0)
    assert images_per_second(steps, 32, 102.0) == pytest.approx(12.0)
    # Later points: the rate is taken from the last point at least a window old.
    t = 102.0 + RATE_WINDOW_S + 1
    assert images_per_second(steps, 64, t) == pytest.approx((64 - 32) / (t - 102.0))
    # No batch for a while (the refresh sets the rate again): it falls.
    sooner = images_per_second(steps, 64, t + 1)
    assert 0 < images_per_second(steps, 64, t + 5) < sooner
    # Fewer images than before: prediction started again (halved batch, a retry): a new series.
    assert images_per_second(steps, 4, t + 6) is None


def test_served_names_are_rays_prefix_and_ours():
    assert SERVED == tuple(PREFIX + n for n in (*FOLD_METRICS, GPU_METRIC))
    assert all(n.startswith("ray_kfold_ray_") for n in SERVED)
