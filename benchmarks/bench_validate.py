"""Image checks of `load_coco`: header reads in a thread pool vs the old per-file check.

    .venv/bin/python benchmarks/bench_validate.py                     # 118,287 images, S3: 5,000
    .venv/bin/python benchmarks/bench_validate.py --images 20000 --s3-images 2000 --large 500

Data (generated once, cached under ``--cache``): COCO-train's count of 32x32 JPEGs (64 distinct
files' bytes, ~0.8 KiB each; COCO-like names ``000000000001.jpg``) with one box each, and
``--large`` 640x480 JPEGs (~COCO's size, ~150 KiB each). Only the image-file check is timed
(`_files.check_image_files`, the json already parsed); ``load_coco`` as a whole is timed once.

Baselines, in the same process, same thread pool and chunking:

* ``old check``: kfold-ray's previous per-file check, verbatim: ``stat``, ``Image.open(path)``,
  ``getexif()``, ``verify()``, then a second open for the JPEG end-of-image marker.
* ``full decode``: ``Image.open`` + ``load()`` (+ EXIF), what checking by decoding would cost.
* on S3, ``old check``: each file downloaded whole, then the old check on its bytes (the old
  code could not read a URI at all; this is what a straightforward port would do).

S3 is moto's server on 127.0.0.1, reached through pyarrow's real S3 client. Moto is a Python
server that is CPU-bound at a few hundred requests/s on this VM (it shares the CPUs with the
client), so its numbers measure moto; what carries over to S3 is the requests per image (2 for a
file up to 256 KiB: HEAD + GET; 3 for a bigger JPEG: HEAD + head + tail) and that 64 threads keep
64 requests in flight. Uploading to moto is slow too, so S3 runs on ``--s3-images`` of the images.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kfold_ray.data.validate import _files, _json  # noqa: E402
from kfold_ray.data._dataset import load_coco  # noqa: E402
from kfold_ray.storage._storage import open_location  # noqa: E402

VARIANTS = 64


# ---- data ---------------------------------------------------------------------------------------
def make_dataset(folder: Path, n: int, size: tuple[int, int], variants: int) -> Path:
    """``folder/annotations.json`` + ``folder/images/*.jpg`` (cached: made once per folder)."""
    ann = folder / "annotations.json"
    if ann.exists():
        return ann
    from PIL import Image

    rng = np.random.default_rng(0)
    w, h = size
    blobs = []
    for _ in range(variants):
        # smooth colour gradients + mild noise: compresses like a photo, not like noise
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        base = rng.uniform(0, 255, 3) + rng.uniform(-1, 1, 3) * (xx[..., None] / w * 120) \
            + rng.uniform(-1, 1, 3) * (yy[..., None] / h * 120)
        pixels = np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
        blobs.append(buf.getvalue())
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    names = [f"{i + 1:012d}.jpg" for i in range(n)]

    def write(i: int) -> None:
        (images / names[i]).write_bytes(blobs[i % variants])

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(write, range(n), chunksize=512))
    doc = {
        "images": [{"id": i + 1, "file_name": names[i], "width": w, "height": h} for i in range(n)],
        "annotations": [{"id": i + 1, "image_id": i + 1, "category_id": 1, "iscrowd": 0,
                         "bbox": [w // 4, h // 4, w // 2, h // 2], "area": w * h // 4}
                        for i in range(n)],
        "categories": [{"id": 1, "name": "thing"}],
    }  # fmt: skip
    tmp = ann.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc))
    tmp.replace(ann)  # last: its presence means the set is whole
    return ann


def image_table(ann: Path) -> _json.ImageTable:
    return _json.parse_images(json.loads(ann.read_bytes())["images"], str(ann))


# ---- the old check, verbatim (kfold_ray/_json.py before image roots could be URIs) ----------
def old_check_file(root: Path, name: str, want: tuple[int, int], decode: bool):
    full = root / name
    try:
        st = full.stat()
    except FileNotFoundError:
        return -1, "not found", None
    if not stat.S_ISREG(st.st_mode):
        return -1, "not a file", None
    if not decode:
        return st.st_size, None, None
    try:
        got = old_image_size(full, st.st_size)
    except Exception as exc:  # noqa: BLE001
        return -1, f"corrupt: {exc}", str(full)
    if got[:2] != want:
        return -1, "size mismatch", None
    return st.st_size, None, None


def old_image_size(full, nbytes: int, data: bytes | None = None) -> tuple[int, int, bool]:
    from PIL import Image

    with Image.open(full if data is None else io.BytesIO(data)) as im:
        w, h = im.size
        fmt = im.format
        has_exif = fmt != "PNG" or "exif" in im.info
        turned = has_exif and im.getexif().get(0x0112) in {5, 6, 7, 8}
        im.verify()
    if fmt == "JPEG":
        if data is None:
            with open(full, "rb") as f:
                f.seek(max(0, nbytes - 1024))
                tail = f.read()
        else:
            tail = data[-1024:]
        if b"\xff\xd9" not in tail:
            raise OSError("truncated JPEG (no end-of-image marker)")
    return (h, w, True) if turned else (w, h, False)


def full_decode(root: Path, name: str, want: tuple[int, int], decode: bool):
    from PIL import Image, ImageOps

    with Image.open(root / name) as im:
        im = ImageOps.exif_transpose(im)
        im.load()
        return os.stat(root / name).st_size, None if im.size == want else "size", None


def s3_old_check(files: _files.ImageFiles):
    """Download each file whole, then the old check on its bytes."""

    def check(name, want):
        with files.fs.open_input_file(files.path(name)) as f:
            data = f.read()
        got = old_image_size(None, len(data), data)
        return len(data), None if got[:2] == want else "size", None

    return check


def run_pool(check, images: _json.ImageTable, threads: int) -> float:
    """Seconds to run ``check(name, want)`` on every image, as check_image_files does."""
    n = len(images.file_names)
    chunk = max(1, min(64, -(-n // (4 * threads))))

    def part(start: int) -> None:
        for i in range(start, min(start + chunk, n)):
            size, problem, _ = check(images.file_names[i], (int(images.widths[i]), int(images.heights[i])))
            assert problem is None, (images.file_names[i], problem)

    t = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(part, range(0, n, chunk)))
    return time.perf_counter() - t


def timed(fn, repeat: int = 1) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


# ---- S3 (moto) ----------------------------------------------------------------------------------
def start_moto() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(Path(tempfile.gettempdir()) / f"moto-bench-validate-{port}.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("moto server did not start") from None
            time.sleep(0.2)
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true")  # fmt: skip
    return proc, endpoint


def upload(folder: Path, names: list[str], uri: str, threads: int = 16) -> float:
    fs, prefix, _ = open_location(uri)

    def put(name: str) -> None:
        with fs.open_output_stream(f"{prefix}/images/{name}") as out:
            out.write((folder / "images" / name).read_bytes())

    t = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(put, names, chunksize=64))
    return time.perf_counter() - t


# ---- main ---------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=118_287, help="32x32 JPEGs checked locally")
    ap.add_argument("--large", type=int, default=2_000, help="640x480 JPEGs checked locally")
    ap.add_argument("--s3-images", type=int, default=5_000, help="32x32 JPEGs checked on S3 (moto)")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "kfold-ray-bench-validate")
    ap.add_argument("--repeat", type=int, default=3, help="best of this many runs (local)")
    args = ap.parse_args()

    # (what, images, seconds, old check's seconds, or minus the new check's for a reference row)
    rows: list[tuple[str, int, float, float | None]] = []
    lt = _files.LOCAL_THREADS

    t = time.perf_counter()
    small = make_dataset(args.cache / f"small-{args.images}", args.images, (32, 32), VARIANTS)
    large = make_dataset(args.cache / f"large-{args.large}", args.large, (640, 480), 16) if args.large else None
    print(f"data ready in {time.perf_counter() - t:.1f} s under {args.cache}", flush=True)

    for label, ann in (("32x32 JPEG", small), ("640x480 JPEG", large)):
        if ann is None:
            continue
        images = image_table(ann)
        root = ann.parent / "images"
        files = _files.ImageFiles(*open_location(root)[:2], str(root))
        n = len(images.file_names)
        kb = sum((root / images.file_names[i]).stat().st_size for i in range(min(n, 256))) / min(n, 256) / 1024
        new = old = float("inf")
        for _ in range(args.repeat):  # interleaved: both see the same load from other jobs
            new = min(new, timed(lambda: _files.check_image_files(files, images, decode=True, path=str(ann))))
            old = min(old, run_pool(lambda nm, w: old_check_file(root, nm, w, True), images, lt))
        dec = run_pool(lambda nm, w: full_decode(root, nm, w, True), images, lt)
        lookup = timed(lambda: _files.check_image_files(files, images, decode=False, path=str(ann)), args.repeat)
        rows += [(f"local {label} ({kb:.1f} KiB), headers", n, new, old),
                 (f"local {label}, full decode (reference)", n, dec, -new),
                 (f"local {label}, check_images=False", n, lookup, None)]  # fmt: skip
        print(f"{label}: headers {new:.2f} s, old check {old:.2f} s, full decode {dec:.2f} s, "
              f"lookup only {lookup:.2f} s", flush=True)

    t_load = timed(lambda: load_coco(small, small.parent / "images"))
    rows.append(("local load_coco() whole (json + checks)", args.images, t_load, None))

    if args.s3_images:
        proc, endpoint = start_moto()
        try:
            import pyarrow.fs as pafs

            bucket = f"bench-{uuid.uuid4().hex[:8]}"
            pafs.S3FileSystem(endpoint_override=endpoint, allow_bucket_creation=True).create_dir(bucket)
            doc = json.loads(small.read_bytes())
            n3 = min(args.s3_images, args.images)
            doc["images"], doc["annotations"] = doc["images"][:n3], doc["annotations"][:n3]
            names = [im["file_name"] for im in doc["images"]]
            uri = f"s3://{bucket}/coco"
            fs, prefix, _ = open_location(uri)
            with fs.open_output_stream(f"{prefix}/annotations.json") as out:
                out.write(json.dumps(doc).encode())
            sample = min(500, n3)
            t_sample = upload(small.parent, names[:sample], uri)
            print(f"upload to moto: {sample / t_sample:.0f} images/s on a {sample}-image sample: all "
                  f"{args.images:,} would take {args.images * t_sample / sample / 60:.0f} min; "
                  f"S3 runs on {n3:,}", flush=True)
            t_up = upload(small.parent, names[sample:], uri) + t_sample
            print(f"uploaded {n3} images to moto in {t_up:.1f} s ({n3 / t_up:.0f}/s)", flush=True)
            images = _json.parse_images(doc["images"], uri)
            files = _files.ImageFiles(*open_location(f"{uri}/images")[:2], f"{uri}/images")
            new = timed(lambda: _files.check_image_files(files, images, decode=True, path=uri))
            old = run_pool(s3_old_check(files), images, _files.REMOTE_THREADS)
            one, n1 = _files.REMOTE_THREADS, min(1000, n3)
            try:
                _files.REMOTE_THREADS = 1
                single = timed(lambda: _files.check_image_files(
                    files, _json.parse_images(doc["images"][:n1], uri), decode=True, path=uri))
            finally:
                _files.REMOTE_THREADS = one
            lookup = timed(lambda: _files.check_image_files(files, images, decode=False, path=uri))
            t_s3load = timed(lambda: load_coco(f"{uri}/annotations.json", f"{uri}/images"))
            rows += [("S3 (moto) 32x32 JPEG, headers, 64 threads", n3, new, old),
                     ("S3 (moto) 32x32 JPEG, headers, 1 thread", n1, single, None),
                     ("S3 (moto) 32x32 JPEG, check_images=False", n3, lookup, None),
                     ("S3 (moto) load_coco() whole (json + checks)", n3, t_s3load, None)]  # fmt: skip
        finally:
            proc.terminate()
            proc.wait(10)

    print()
    print("| check | images | seconds | images/s | old check, images/s | speed-up |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for what, n, sec, old in rows:
        if old is None:
            extra = " | "
        elif old < 0:
            extra = f" | (new check {sec / -old:.1f}x faster)"
        else:
            extra = f"{n / old:,.0f} | {old / sec:.2f}x"
        print(f"| {what} | {n:,} | {sec:.2f} | {n / sec:,.0f} | {extra} |")
    print(f"\nthreads: local {lt}, remote {_files.REMOTE_THREADS}; cpus {os.cpu_count()}")


if __name__ == "__main__":
    main()
