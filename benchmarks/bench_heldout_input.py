"""Held-out input: images read + decoded + resized by 1 thread vs the fold's pool, local and S3.

What a fold's prediction loop waits on before each model call (`kfold_ray.detectron2._predict.
prefetch`, the model left out): the same COCO-sized JPEGs (640x480, ~60-90 KiB) read from the
local disk and from S3, where each request waits for its first byte (real S3: ~20-40 ms; here
moto's server behind a WSGI hook that sleeps ``--delay-ms`` per request, in a process of its own,
so the delay costs no CPU), with 1 thread (what kfold-ray did before: one prefetch thread) vs
``--threads`` (default: `input_threads` of ``--cpus``, as a fold gets it). Same images, same
order, same process; the rates are images/s, the ratio is what counts.

    .venv/bin/python benchmarks/bench_heldout_input.py                    # ~2-3 min here
    .venv/bin/python benchmarks/bench_heldout_input.py --images 400 --cpus 12 --delay-ms 30
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

BUCKET = "bench-heldout"
_S3_ENV = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true"}


# ---- S3 with a first-byte delay: moto's app behind a sleeping WSGI hook ------------------------
def serve_delayed_s3(port: int, delay_s: float) -> None:
    """Run moto's S3 on 127.0.0.1:port; every request waits ``delay_s`` before it is handled."""
    import threading

    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from werkzeug.serving import make_server

    app = DomainDispatcherApplication(create_backend_app)
    counts = {"requests": 0}
    lock = threading.Lock()

    def delayed(environ, start_response):
        if environ.get("PATH_INFO") == "/__bench/requests":
            start_response("200 OK", [("Content-Type", "application/json")])
            return [json.dumps(counts).encode()]
        with lock:
            counts["requests"] += 1
        time.sleep(delay_s)
        return app(environ, start_response)

    make_server("127.0.0.1", port, delayed, threaded=True,
                request_handler=MotoRequestHandler).serve_forever()


class DelayedS3:
    def __init__(self, delay_ms: float) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--serve-s3", str(self.port), str(delay_ms / 1000)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        for _ in range(300):
            try:
                opener.open(self.endpoint + "/__bench/requests", timeout=2).close()
                break
            except OSError:
                time.sleep(0.1)
        self.opener = opener

    def requests(self) -> int:
        with self.opener.open(self.endpoint + "/__bench/requests", timeout=10) as r:
            return json.loads(r.read())["requests"]

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


# ---- data ----------------------------------------------------------------------------------------
def make_jpegs(root: Path, n: int, width: int, height: int, classes: int = 1) -> Path:
    """``n`` COCO-sized JPEGs (a gradient, boxes, noise: ~60-90 KiB at 640x480) and their json
    (``classes`` categories, one box per image)."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:height, 0:width]
    images, annotations = [], []
    for i in range(n):
        base = np.stack([(xx * 255 // width), (yy * 255 // height), np.full_like(xx, 40 * (i % 6))], -1)
        noise = rng.integers(-12, 13, size=base.shape)
        img = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        x, y = int(rng.integers(0, width - 100)), int(rng.integers(0, height - 100))
        draw.rectangle([x, y, x + 80, y + 60], fill=(230, 25, 75))
        name = f"{i:06d}.jpg"
        img.save(root / "images" / name, quality=90)
        images.append({"id": i + 1, "file_name": name, "width": width, "height": height})
        annotations.append({"id": i + 1, "image_id": i + 1, "category_id": 1 + i % classes,
                            "bbox": [x, y, 80, 60], "area": 4800, "iscrowd": 0})
    categories = [{"id": c + 1, "name": f"class{c}"} for c in range(classes)]
    doc = {"images": images, "annotations": annotations, "categories": categories}
    (root / "annotations.json").write_text(json.dumps(doc))
    return root


def upload(root: Path, endpoint: str) -> tuple[str, str]:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="bench",
                          aws_secret_access_key="bench", region_name="us-east-1")
    client.create_bucket(Bucket=BUCKET)
    client.upload_file(str(root / "annotations.json"), BUCKET, "data/annotations.json")
    for f in sorted((root / "images").iterdir()):
        client.upload_file(str(f), BUCKET, f"data/images/{f.name}")
    return f"s3://{BUCKET}/data/annotations.json", f"s3://{BUCKET}/data/images"


# ---- the measurement -------------------------------------------------------------------------------
def input_rate(dataset, cfg, threads: int, batch_size: int) -> float:
    """Images/s through `prefetch` (read + decode + resize, batches in order), model left out."""
    from kfold_ray.detectron2._predict import by_size, prefetch

    ordered = by_size(dataset, np.arange(dataset.num_images))
    batches = [ordered[i:i + batch_size] for i in range(0, len(ordered), batch_size)]
    start = time.perf_counter()
    seen = []
    for indices, inputs in prefetch(batches, dataset, cfg, threads=threads):
        assert len(inputs) == len(indices) and inputs[0]["image"].shape[0] == 3
        seen.extend(indices.tolist())
    seconds = time.perf_counter() - start
    assert seen == ordered.tolist(), "batches out of order"
    return len(seen) / seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=160)
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--cpus", type=float, default=2, help="the fold's CPUs (sizes the pool)")
    p.add_argument("--threads", type=int, default=None, help="pool size (default: from --cpus)")
    p.add_argument("--delay-ms", type=float, default=30.0, help="S3 first-byte delay per request")
    p.add_argument("--repeats", type=int, default=2, help="best of, each")
    p.add_argument("--serve-s3", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve_s3:
        serve_delayed_s3(int(args.serve_s3[0]), float(args.serve_s3[1]))
        return

    from kfold_ray._config import TrainConfig
    from kfold_ray.data._dataset import load_coco
    from kfold_ray.detectron2 import Detectron2Backend
    from kfold_ray.detectron2._config import import_detectron2
    from kfold_ray.detectron2._predict import input_threads

    import_detectron2()
    threads = args.threads or input_threads(args.cpus)
    cfg = Detectron2Backend().build_cfg(TrainConfig(model="tiny"), num_classes=1, device="cpu")
    cfg.defrost()
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = 800, 1333  # Detectron2's COCO defaults
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = make_jpegs(Path(tmp) / "data", args.images, args.width, args.height)
        size_kib = np.mean([f.stat().st_size for f in (root / "images").iterdir()]) / 1024
        local = load_coco(root / "annotations.json", root / "images")
        s3 = DelayedS3(args.delay_ms)
        try:
            os.environ.update(_S3_ENV, AWS_ENDPOINT_URL=s3.endpoint)
            remote = load_coco(*upload(root, s3.endpoint), check_images=False)
            for where, dataset in (("local disk", local), (f"S3 (moto, +{args.delay_ms:g} ms/request)", remote)):
                for n in (1, threads):
                    before = s3.requests()
                    best = max(input_rate(dataset, cfg, n, args.batch_size) for _ in range(args.repeats))
                    per_image = (s3.requests() - before) / (args.repeats * dataset.num_images)
                    results[(where, n)] = (best, per_image)
        finally:
            s3.close()
    print(f"{args.images} JPEGs {args.width}x{args.height} (~{size_kib:.0f} KiB), resized to "
          f"{cfg.INPUT.MIN_SIZE_TEST}/{cfg.INPUT.MAX_SIZE_TEST}, batch {args.batch_size}, "
          f"pool {threads} threads (cpus {args.cpus:g}), {os.cpu_count()} cores, best of {args.repeats}")
    for where in dict.fromkeys(w for w, _ in results):
        one, many = results[(where, 1)][0], results[(where, threads)][0]
        requests = results[(where, threads)][1]
        extra = f", {requests:.1f} S3 requests/image" if requests else ""
        print(f"  {where:32s} 1 thread {one:7.1f} img/s | {threads} threads {many:7.1f} img/s | "
              f"{many / one:5.2f}x{extra}")


if __name__ == "__main__":
    main()
