"""Checks on the image files that the json names: present, readable, and of the json's size.

Run after the json checks, on a thread pool (file I/O, network and C code release the GIL):
every file is looked up, and with ``decode`` its header is read (not its pixels) to compare its
size, after EXIF rotation, with the json's. Local folders are read with plain os calls, other
stores through their ``pyarrow.fs`` filesystem with as few requests per file as possible.
"""

from __future__ import annotations

import contextlib
import io
import os
import stat
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Callable, Iterator, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from ..._exceptions import DatasetError, one_line
from ...storage._locations import join, remote_info, shown
from ._jpeg import _MORE, jpeg_header
from ._problems import Problems, _at, show

if TYPE_CHECKING:
    from ._image_table import ImageTable

#: ``read(nbytes, offset) -> bytes`` of an open file.
_Reader = Callable[[int, int], bytes]


# ---- image files ------------------------------------------------------------------------------
_CHUNK = 64
_SWAPS_SIDES = {5, 6, 7, 8}  # EXIF orientations that Detectron2's read_image turns by 90 degrees
#: Bytes read from the start of a JPEG for its header (markers up to the start of scan: size,
#: EXIF). Read more, up to the whole file, when the header runs past them (large ICC/XMP/EXIF).
HEAD_BYTES = 64 << 10
_GROW_BYTES = 1 << 20
#: Bytes read from the end of a JPEG for its end-of-image marker.
TAIL_BYTES = 1024
#: On a remote store a file up to this size is read in one request (HEAD + GET, instead of HEAD +
#: head + tail): a request costs a round trip (~20 ms on S3), and 64 threads moving 256 KiB
#: each per ~40 ms stay well under a node's bandwidth. COCO's JPEGs average ~160 KB.
REMOTE_WHOLE_BYTES = 256 << 10
_JPEG_MAGIC = b"\xff\xd8\xff"
#: Threads for the file checks: local files are cheap, remote stores are latency-bound.
LOCAL_THREADS = min(16, 4 * (os.cpu_count() or 1))
REMOTE_THREADS = 64
#: Requests one pyarrow S3 client keeps in flight (the AWS SDK's default connection pool): the
#: remote check opens one filesystem per this many threads.
REMOTE_CONNECTIONS = 25


class ImageFiles:
    """The files under an image root: a local folder (or mount), or a folder of a pyarrow
    filesystem (``s3://bucket/prefix``, ...).

    Attributes:
        fs: the filesystem; root: the folder's path in it; location: its absolute path or URI.
    """

    def __init__(self, fs: pafs.FileSystem, root: str, location: str) -> None:
        self.fs, self.root, self.location = fs, root, location
        self.local = isinstance(fs, pafs.LocalFileSystem)

    def path(self, name: str) -> str:
        """The path of image ``name`` in ``fs``."""
        return join(self.root, name)

    def location_of(self, name: str) -> str:
        """Image ``name`` as an absolute path or URI, for messages."""
        return shown(join(self.location, name))

    def read_bytes(self, name: str) -> bytes:
        """The whole file (raises OSError / FileNotFoundError as the filesystem does)."""
        if self.local:
            with open(self.path(name), "rb") as f:
                return f.read()
        with self.fs.open_input_file(self.path(name)) as f:
            return f.read()


class FileFault(NamedTuple):
    """An image whose file is at fault: ``problem`` is one line without the ``images[i] (id
    ...)`` prefix; ``path`` the file to name (the image's location when the file itself is bad,
    else the json); ``unreadable``: the file is missing, not a file, corrupt or cannot be read
    (not: its size differs from the json's, a problem of the json)."""

    index: int
    problem: str
    path: str
    unreadable: bool


def check_image_files(files: ImageFiles, images: ImageTable, *, decode: bool, path: str,
                      faults: list[FileFault] | None = None) -> np.ndarray:
    """int64 (N,) byte size of each image file (-1 where at fault).

    Always looks every file up (missing file, not a file). With ``decode``, also reads each
    one's header: readable, size (after EXIF rotation, as Detectron2 reads it) equal to the
    json's; a JPEG must end with its end-of-image marker (a ranged read of its last bytes); a PNG
    is read whole for ``verify()`` (every chunk's CRC). On a remote store, files up to
    `REMOTE_WHOLE_BYTES` are read in one request instead of two ranged ones. Pixels are never
    decoded. Runs in a thread pool (file I/O, network and C code): more threads for a remote store.

    Every image at fault is appended to ``faults`` (json order); without ``faults``, they are
    raised as one DatasetError. Images whose ``file_name`` is invalid (``images.name_ok``) are
    skipped, and the size of those whose width/height is invalid is not compared. An image
    root that is missing or not a folder raises DatasetError.
    """
    _check_root(files)
    n = len(images.file_names)
    sizes = np.empty(n, dtype=np.int64)
    threads = LOCAL_THREADS if files.local else REMOTE_THREADS
    chunk = max(1, min(_CHUNK, -(-n // (4 * threads))))  # small datasets: use every thread too
    starts = range(0, n, chunk)
    clients = [files] if files.local else _clients(files, -(-min(threads, len(starts)) // REMOTE_CONNECTIONS))
    found: list[FileFault] = [] if faults is None else faults
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="kfold-ray-check")
    try:
        jobs = pool.map(
            lambda s: _check_chunk(clients[(s // chunk) % len(clients)], images, s, chunk, decode), starts
        )
        for start, (chunk_sizes, chunk_faults) in zip(starts, jobs):
            sizes[start : start + len(chunk_sizes)] = chunk_sizes
            found.extend(f._replace(path=f.path or path) for f in chunk_faults)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    if faults is None and found:
        problems = Problems()
        for f in found:
            problems.add(f"{_at('images', f.index, {'id': int(images.ids[f.index])})}: {f.problem}", f.path)
        problems.raise_if_any()
    return sizes


def _clients(files: ImageFiles, count: int) -> list[ImageFiles]:
    """``files`` and up to ``count - 1`` more views of it, each with a filesystem (and so a
    connection pool) of its own; fewer if a filesystem cannot be opened again."""
    out = [files]
    for _ in range(count - 1):
        try:
            fs = pafs.FileSystem.from_uri(files.location)[0]
        except (OSError, ValueError, pa.ArrowException):
            break
        out.append(ImageFiles(fs, files.root, files.location))
    return out


def _check_root(files: ImageFiles) -> None:
    where = shown(files.location)
    if files.local:
        if not os.path.isdir(files.root):
            what = "does not exist" if not os.path.exists(files.root) else "is not a folder"
            raise DatasetError(f"image root {what}", path=where)
        return
    kind = remote_info(files.fs, files.root, "image root", files.location).type
    if kind == pafs.FileType.NotFound:
        raise DatasetError("image root does not exist", path=where)
    if kind != pafs.FileType.Directory:
        raise DatasetError("image root is not a folder", path=where)


def _check_chunk(files: ImageFiles, images: ImageTable, start: int, chunk: int,
                 decode: bool) -> tuple[list[int], list[FileFault]]:
    sizes, faults = [], []
    for i in range(start, min(start + chunk, len(images.file_names))):
        if images.name_ok is not None and not images.name_ok[i]:
            sizes.append(-1)  # its name is a problem already
            continue
        want = None
        if images.size_ok is None or images.size_ok[i]:
            want = (int(images.widths[i]), int(images.heights[i]))
        size, problem, bad_file, unreadable = _check_file(files, images.file_names[i], want, decode)
        if problem is not None:
            faults.append(FileFault(i, problem, bad_file or "", unreadable))
        sizes.append(size)
    return sizes, faults


class _Missing(Exception):
    """The file is not there (``directory``: a folder is)."""

    def __init__(self, directory: bool) -> None:
        self.directory = directory


def _check_file(files: ImageFiles, name: str, want: tuple[int, int] | None,
                decode: bool) -> tuple[int, str | None, str | None, bool]:
    """(byte size, problem or None, the image's location when the file itself is at fault,
    whether the file is unreadable). ``want``: the json's (width, height), None: not compared."""
    try:
        with _open(files, name, decode) as (size, read):
            if not decode:
                return size, None, None, False
            try:
                whole = 0 if files.local else REMOTE_WHOLE_BYTES
                got = _image_size(read, size, files.location_of(name), whole_below=whole)
            except Exception as exc:  # noqa: BLE001 - PIL raises many kinds for a bad file
                detail = one_line(exc)
                return -1, f"corrupt or unreadable image {show(name)}: {detail}", files.location_of(name), True
    except _Missing as m:
        root = shown(files.location)
        if m.directory:
            return -1, f"{show(name)} under image root {root} is not a file", None, True
        hint = " (it uses '\\'; write '/' between folders)" if "\\" in name else ""
        return -1, f"file {show(name)} not found under image root {root}{hint}", None, True
    except (OSError, pa.ArrowException) as exc:
        cause = exc.strerror if isinstance(exc, OSError) and exc.strerror else one_line(exc)[:300]
        return -1, f"cannot read file {show(name)}: {cause}", files.location_of(name), True
    if want is not None and got[:2] != want:
        turned = " after its EXIF rotation" if got[2] else ""
        msg = (f"'width'/'height' {want[0]}x{want[1]} do not match the file {show(name)}, "
               f"which is {got[0]}x{got[1]}{turned}")  # fmt: skip
        return -1, msg, None, False
    return size, None, None, False


@contextlib.contextmanager
def _open(files: ImageFiles, name: str, decode: bool) -> Iterator[tuple[int, _Reader | None]]:
    """Yield (byte size, ``read(nbytes, offset) -> bytes``) of a regular file, or raise
    `_Missing`. Without ``decode`` only the size is looked up (``read`` is None)."""
    full = files.path(name)
    if files.local:
        try:
            st = os.stat(full)
        except FileNotFoundError:
            raise _Missing(directory=False) from None
        if not stat.S_ISREG(st.st_mode):
            raise _Missing(directory=True)
        if not decode:
            yield st.st_size, None
            return
        fd = os.open(full, os.O_RDONLY)
        try:
            yield st.st_size, lambda nbytes, offset: os.pread(fd, nbytes, offset)
        finally:
            os.close(fd)
        return
    if not decode:
        info = files.fs.get_file_info(full)
        if info.type != pafs.FileType.File:
            raise _Missing(directory=info.type == pafs.FileType.Directory)
        yield info.size, None
        return
    try:  # one request for the size (and existence) ...
        f = files.fs.open_input_file(full)
    except (OSError, pa.ArrowException):
        kind = files.fs.get_file_info(full).type  # ... and one more only when it fails
        if kind != pafs.FileType.File:
            raise _Missing(directory=kind == pafs.FileType.Directory) from None
        raise
    with f:
        yield f.size(), f.read_at


class _Named(io.BytesIO):
    """Image bytes that PIL's messages name by the file's location (as when opened by path)."""

    def __init__(self, data: bytes, location: str) -> None:
        super().__init__(data)
        self.location = location

    def __repr__(self) -> str:
        return repr(self.location)


def _image_size(read: _Reader, nbytes: int, location: str, *, whole_below: int = 0) -> tuple[int, int, bool]:
    """(width, height, turned) as Detectron2 will read the image; raises if the file is bad.

    A JPEG is judged by its header (the bytes up to the start of scan, usually within the first
    `HEAD_BYTES`) and its last `TAIL_BYTES` (end-of-image marker): a ranged read of each. Other
    formats are read whole: PNG ``verify()`` checks every chunk's CRC, and WebP/TIFF may keep
    their EXIF after the pixels. A file of at most ``whole_below`` bytes is read in one go.
    Nothing is decoded.
    """
    data = read(nbytes if nbytes <= whole_below else min(nbytes, HEAD_BYTES), 0)
    if not data.startswith(_JPEG_MAGIC):
        data += _read_more(read, len(data), nbytes - len(data))
    while True:
        whole = len(data) >= nbytes
        try:
            got = _header(data, location, whole)
        except Exception:  # a header cut by our read, or a bad file: only the whole file says
            if whole:
                raise
            got = None
        if got is not None:
            break
        more = _read_more(read, len(data), min(nbytes, max(4 * len(data), _GROW_BYTES)) - len(data))
        if not more:  # the file shrank under us: judge what there is
            nbytes = len(data)
        data += more
    w, h, fmt, turned = got
    if fmt == "JPEG":
        tail = data[-TAIL_BYTES:] if len(data) >= nbytes else read(TAIL_BYTES, nbytes - TAIL_BYTES)
        if b"\xff\xd9" not in tail:
            raise OSError("truncated JPEG (no end-of-image marker)")
    return (h, w, True) if turned else (w, h, False)


def _read_more(read: _Reader, offset: int, nbytes: int) -> bytes:
    return read(nbytes, offset) if nbytes > 0 else b""


def _header(data: bytes, location: str, whole: bool) -> tuple[int, int, str, bool] | None:
    """(width, height, format, EXIF turns it) from ``data``; None when a JPEG header runs past
    it (``whole``: ``data`` is the entire file, then ``verify()`` runs too)."""
    from PIL import Image  # Pillow is only needed when images are checked

    if data.startswith(_JPEG_MAGIC):
        fast = jpeg_header(data, Image.MAX_IMAGE_PIXELS)
        if fast is _MORE and not whole:
            return None
        if isinstance(fast, tuple):
            return fast[0], fast[1], "JPEG", fast[2] in _SWAPS_SIDES
    with Image.open(_Named(data, location)) as im:
        fmt = im.format
        if not whole and not (fmt == "JPEG" and im.tile):  # start of scan not reached yet
            return None
        w, h = im.size
        # PNG keeps EXIF after the pixels, and getexif() would decode them all: use it only
        # when the header already carried it.
        has_exif = fmt != "PNG" or "exif" in im.info
        turned = has_exif and im.getexif().get(0x0112) in _SWAPS_SIDES
        if whole:
            im.verify()
    return w, h, fmt, turned
