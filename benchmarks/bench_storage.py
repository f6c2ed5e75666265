"""Persisting prediction parts: S3 (moto's server on 127.0.0.1) vs the local disk, per batch.

    python benchmarks/bench_storage.py                 # 400 batches of 8 images x 100 detections
    python benchmarks/bench_storage.py --batches 1000 --detections 300

The driver persists every streamed batch before it takes the next one (`Reducer.add`); a fold
stalls only when the driver falls 16 batches behind (the stream's backpressure). So the question
is: how many batches per second can the driver persist, against how many the folds produce?
Measured in one process, the same batches, local folder first, then S3 through pyarrow's real S3
client (moto adds its own Python-server latency: a real S3 PUT from an EC2 node in-region is
~10-30 ms, so S3's own numbers are a few times slower than moto's here and the local cache on
the reducer matters).

It also times the stitch: reading every part back from S3 vs from the driver's local cache
(`FoldPartStore(cache_dir=...)`), which the driver uses for the parts of the current session.

Production rate to compare with (DESIGN notes, one H100, R50-FPN 640 px): held-out inference at
187 img/s per fold = 23 batches/s of 8 images per fold.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kfold_ray.run._parts import FoldPartStore  # noqa: E402
from kfold_ray.run._reduce import Reducer  # noqa: E402
from kfold_ray._schema import make_prediction_batch  # noqa: E402
from kfold_ray.storage._storage import Storage  # noqa: E402


def batches(n: int, per_batch: int, dets: int, k: int):
    rng = np.random.default_rng(0)
    out = []
    for b in range(n):
        imgs = np.arange(b * per_batch, (b + 1) * per_batch, dtype=np.int64)
        owner = np.repeat(imgs, dets)
        xy = rng.uniform(0, 500, (owner.size, 2)).astype(np.float32)
        out.append(make_prediction_batch(
            fold=b % k, image_indices=imgs, det_image_index=owner,
            boxes=np.concatenate([xy, xy + 30], axis=1), scores=rng.random(owner.size, np.float32),
            classes=rng.integers(0, 80, owner.size), image_ids=np.arange(n * per_batch) + 1,
            category_ids=np.arange(80) + 1))
    return out


def start_moto() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # This interpreter's own moto (pinned): moto 5.2.1's CompleteMultipartUpload answers with an
    # error inside a 200 OK that pyarrow's client rejects.
    moto = str(Path(sys.executable).parent / "moto_server")
    proc = subprocess.Popen([moto, "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="testing",
                      AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
                      AWS_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true")
    return proc, endpoint


def persist(store: FoldPartStore, items) -> np.ndarray:
    times = []
    for seq, b in enumerate(items):
        t = time.perf_counter()
        store.put(b, seq=seq)
        times.append(time.perf_counter() - t)
    return np.array(times)


def reducer_rate(storage: Storage, items, cache: Path) -> float:
    """Batches/s through `Reducer.add` (uploads side by side on an object store), all landed."""
    reducer = Reducer(storage, cache_dir=cache)
    t = time.perf_counter()
    for b in items:
        reducer.add(b)
    reducer.close()
    return len(items) / (time.perf_counter() - t)


def stitch_read(store: FoldPartStore, k: int) -> float:
    t = time.perf_counter()
    for f in range(k):
        store.read_fold(f)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, default=400)
    ap.add_argument("--images-per-batch", type=int, default=8)
    ap.add_argument("--detections", type=int, default=100, help="per image")
    ap.add_argument("-k", type=int, default=5)
    args = ap.parse_args()
    items = batches(args.batches, args.images_per_batch, args.detections, args.k)
    kib = np.mean([b.nbytes for b in items]) / 1024
    proc, endpoint = start_moto()
    try:
        import pyarrow.fs as pafs

        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        pafs.FileSystem.from_uri(f"s3://{bucket}?allow_bucket_creation=true")[0].create_dir(bucket)
        with tempfile.TemporaryDirectory() as tmp:
            local = FoldPartStore(Storage(Path(tmp) / "run"))
            s3 = FoldPartStore(Storage(f"s3://{bucket}/run"))
            cached = FoldPartStore(Storage(f"s3://{bucket}/run2"), cache_dir=Path(tmp) / "cache")
            t_local = persist(local, items)
            t_s3 = persist(s3, items)
            t_cached = persist(cached, items)
            r_local, r_s3, r_cached = (stitch_read(x, args.k) for x in (local, s3, cached))
            rate_reducer = reducer_rate(Storage(f"s3://{bucket}/run3"), items, Path(tmp) / "c3")
    finally:
        proc.terminate()
    need = 187 / args.images_per_batch
    print(f"{args.batches} batches of {args.images_per_batch} images x {args.detections} detections "
          f"(~{kib:.0f} KiB each), k={args.k}")
    print(f"{'target':<22} {'median ms':>10} {'p95 ms':>8} {'max ms':>8} {'batches/s':>10} {'folds fed':>10}")
    for name, t in (("local disk", t_local), ("S3 (moto)", t_s3), ("S3 + local cache", t_cached)):
        rate = 1 / t.mean()
        print(f"{name:<22} {1e3 * np.median(t):>10.1f} {1e3 * np.percentile(t, 95):>8.1f} "
              f"{1e3 * t.max():>8.1f} {rate:>10.0f} {rate / need:>10.1f}")
    print(f"{'S3, Reducer (8 uploads)':<22} {'':>10} {'':>8} {'':>8} {rate_reducer:>10.0f} "
          f"{rate_reducer / need:>10.1f}")
    print(f"S3 per batch vs local: {t_s3.mean() / t_local.mean():.1f}x; the Reducer's parallel "
          f"uploads vs one at a time: {rate_reducer * t_s3.mean():.1f}x")
    print(f"read back every part for the stitch: local {r_local:.2f} s, S3 {r_s3:.2f} s, "
          f"S3 with the driver's local cache {r_cached:.2f} s ({r_s3 / r_cached:.0f}x)")
    print(f"'folds fed' = batches/s / {need:.1f} (one H100 fold's inference rate in batches/s): "
          "below the number of folds predicting at once, folds wait on the driver")


if __name__ == "__main__":
    main()
