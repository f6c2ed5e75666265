"""The run's storage: a local folder or an object-store prefix, reached through ``pyarrow.fs``.

On a cluster the driver, the fold actors and the reducer run on nodes that share nothing but the
network and this storage, so every file that a later step, a retry or a resume needs goes through
a `Storage`. The location is a local path or a URI that ``pyarrow.fs.FileSystem.from_uri``
understands (``s3://bucket/prefix``, ``gs://``, ``hdfs://``, ``file:///abs/path``): the convention
of Ray Train's ``RunConfig(storage_path=...)``. Credentials and endpoints come from the standard
variables of each store (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ..., or an instance profile),
never from kfold-ray options.

Writes are atomic: a reader never sees a half-written final name. On a local disk a file is
written under a temporary name beside the final one and renamed; on an object store the object
appears only when its upload completes. Names inside a storage are relative, ``/``-separated.

A `Storage` pickles as its URI: each process (a fold actor on another node) opens the filesystem
itself, with its own credentials.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.fs as pafs

from .._exceptions import StorageError, one_line
from ._atomic import atomic_path

__all__ = ["Storage", "file_sha256", "is_uri", "open_location"]

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_COPY_CHUNK = 8 << 20


def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 hex of a local file, read in chunks (weights and checkpoints are hundreds of MB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_COPY_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def is_uri(location: str | os.PathLike[str]) -> bool:
    """True for ``scheme://...`` locations (``file://`` included), False for plain paths."""
    return isinstance(location, str) and bool(_SCHEME.match(location))


def open_location(location: str | os.PathLike[str], *, what: str = "location"
                  ) -> tuple[pafs.FileSystem, str, str]:
    """(filesystem, path inside it, canonical URI or absolute local path) of a path or URI.

    Raises StorageError naming ``what`` (e.g. ``--run-dir``) when the scheme is unknown.
    """
    if not is_uri(location):
        path = os.path.abspath(os.fspath(location))
        return pafs.LocalFileSystem(), path, path
    text = str(location)
    try:
        fs, path = pafs.FileSystem.from_uri(text)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError, OSError) as e:
        scheme = _SCHEME.match(text).group(1)
        raise StorageError(
            f"{what} {text!r}: cannot open storage with scheme {scheme!r} "
            f"({one_line(e)}); use a local path or an s3://, gs://, hdfs:// or file:// URI"
        ) from None
    if isinstance(fs, pafs.LocalFileSystem):
        return fs, path, path
    return fs, path.rstrip("/"), text.rstrip("/")


# What an object store's error means for the user, by the code in pyarrow's message.
_CAUSES = (
    ("NO_SUCH_BUCKET", "the bucket does not exist"),
    ("ACCESS_DENIED", "access denied: check the credentials (AWS_* variables, instance profile)"),
    ("INVALID_ACCESS_KEY_ID", "access denied: check the credentials (AWS_* variables, instance profile)"),
    ("NETWORK_CONNECTION", "cannot reach the storage endpoint (AWS_ENDPOINT_URL, network)"),
)


def _why(e: BaseException) -> str:
    text = one_line(e)
    for code, meaning in _CAUSES:
        if code in text:
            return f"{meaning} ({text[:200]})"
    return f"cannot write there ({text[:300]})"


class Storage:
    """A folder in local or remote storage; files are addressed by relative ``/`` names.

    Attributes:
        uri: the location as given by the user (absolute path for local folders).
        fs: the pyarrow filesystem.
        root: the folder's path inside ``fs``.
    """

    def __init__(self, location: str | os.PathLike[str], *, what: str = "run dir") -> None:
        self.what = what
        self.fs, self.root, self.uri = open_location(location, what=what)

    def __reduce__(self):
        return (Storage, (self.uri,), {"what": self.what})

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.what = state.get("what", "run dir")

    def __repr__(self) -> str:
        return f"Storage({self.uri!r})"

    def __str__(self) -> str:
        return self.uri

    # ---- names ------------------------------------------------------------------------------
    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    @property
    def local_root(self) -> Path | None:
        """The folder as a local Path when the storage is a local disk (or a mount), else None."""
        return Path(self.root) if self.is_local else None

    @property
    def name(self) -> str:
        """The last component of the location (``run-7`` for ``s3://b/runs/run-7``)."""
        return self.root.rstrip("/").rsplit("/", 1)[-1] or self.root

    def path(self, name: str = "") -> str:
        """The filesystem path of ``name`` (relative, ``/``-separated)."""
        name = name.strip("/")
        return f"{self.root}/{name}" if name else self.root

    def uri_of(self, name: str = "") -> str:
        """``name`` as a URI (or absolute local path) that a user can paste."""
        name = name.strip("/")
        return f"{self.uri}/{name}" if name else self.uri

    def child(self, name: str) -> "Storage":
        """The sub-folder ``name`` as a Storage of its own."""
        return Storage(self.uri_of(name), what=self.what)

    # ---- checks -----------------------------------------------------------------------------
    def check_usable(self) -> None:
        """Prove the storage can be written, before any work starts; create nothing locally.

        Raises StorageError (a bad-input error) naming the location and the cause: unknown
        bucket, bad credentials, unreachable endpoint, not a folder, no permission.
        """
        if self.is_local:
            self._check_local()
            return
        probe = f".kfold-ray-probe-{os.getpid()}-{os.urandom(4).hex()}"
        try:
            if self.fs.get_file_info(self.root).type == pafs.FileType.File:
                raise StorageError(f"{self.what} {self.uri}: is a file, not a folder")
            self.write_bytes(probe, b"ok")
            if self.read_bytes(probe) != b"ok":
                raise StorageError(f"{self.what} {self.uri}: a file written there reads back changed")
            self.delete(probe)
        except StorageError:
            raise
        except (OSError, pa.ArrowException) as e:
            raise StorageError(f"{self.what} {self.uri}: {_why(e)}") from None

    def _check_local(self) -> None:
        path = Path(self.root)
        existing = next((p for p in (path, *path.parents) if p.exists()), None)
        if existing is path and not path.is_dir():
            raise StorageError(f"{self.what} {self.uri}: is a file, not a folder")
        if existing is None or not existing.is_dir():
            raise StorageError(f"{self.what} {self.uri}: {existing} is not a folder")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise StorageError(f"{self.what} {self.uri}: no permission to write in {existing}")

    # ---- reading ----------------------------------------------------------------------------
    def info(self, name: str) -> pafs.FileInfo:
        return self.fs.get_file_info(self.path(name))

    def exists(self, name: str = "") -> bool:
        return self.info(name).type != pafs.FileType.NotFound

    def is_file(self, name: str) -> bool:
        return self.info(name).type == pafs.FileType.File

    def is_dir(self, name: str = "") -> bool:
        return self.info(name).type == pafs.FileType.Directory

    def read_bytes(self, name: str) -> bytes:
        with self.fs.open_input_stream(self.path(name)) as f:
            return f.read()

    def read_text(self, name: str) -> str:
        return self.read_bytes(name).decode("utf-8")

    def read_json(self, name: str) -> Any:
        return json.loads(self.read_bytes(name))

    def open_input_file(self, name: str) -> pa.NativeFile:
        """A random-access file (Arrow IPC / Parquet readers); memory-mapped on a local disk."""
        if self.is_local:
            return pa.memory_map(self.path(name), "r")
        return self.fs.open_input_file(self.path(name))

    def list(self, folder: str = "") -> list[pafs.FileInfo]:
        """Entries directly in ``folder`` (files and folders), sorted by name; [] if it is absent."""
        selector = pafs.FileSelector(self.path(folder), allow_not_found=True, recursive=False)
        return sorted(self.fs.get_file_info(selector), key=lambda i: i.path)

    def list_names(self, folder: str = "") -> list[str]:
        return [i.base_name for i in self.list(folder)]

    def is_empty(self) -> bool:
        return not self.exists() or not self.list()

    def get_file(self, name: str, local: str | os.PathLike[str]) -> Path:
        """Copy ``name`` to the local file ``local`` (atomically); return its path."""
        local = Path(local)
        local.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(local) as tmp:
            with self.fs.open_input_stream(self.path(name)) as src, open(tmp, "wb") as dst:
                while chunk := src.read(_COPY_CHUNK):
                    dst.write(chunk)
        return local

    # ---- writing ----------------------------------------------------------------------------
    def write_bytes(self, name: str, data: bytes) -> None:
        """Write ``name`` atomically (a reader sees the old file, no file, or all of ``data``)."""
        if self.is_local:
            final = Path(self.path(name))
            final.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(final) as tmp:
                tmp.write_bytes(data)
            return
        with _remote_atomic(self.fs, self.path(name)) as out:
            out.write(data)

    def write_text(self, name: str, text: str) -> None:
        self.write_bytes(name, text.encode("utf-8"))

    def write_json(self, name: str, obj: Any, *, indent: int | None = 2) -> None:
        self.write_text(name, json.dumps(obj, indent=indent, ensure_ascii=False, allow_nan=False) + "\n")

    def put_file(self, local: str | os.PathLike[str], name: str) -> None:
        """Copy the local file ``local`` to ``name`` (atomically, streamed)."""
        if self.is_local:
            final = Path(self.path(name))
            final.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(final) as tmp:
                shutil.copyfile(local, tmp)
            return
        with open(local, "rb") as src, _remote_atomic(self.fs, self.path(name)) as out:
            while chunk := src.read(_COPY_CHUNK):
                out.write(chunk)

    @contextlib.contextmanager
    def staged(self, name: str) -> Iterator[Path]:
        """Yield a local path to write ``name`` into; on clean exit it lands atomically in storage.

        For writers that need a real file (Parquet, pickles, HTML): on a local disk the temporary
        file sits beside the final name and is renamed; elsewhere it is uploaded, then removed.
        """
        if self.is_local:
            final = Path(self.path(name))
            final.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(final) as tmp:
                yield tmp
            return
        with tempfile.TemporaryDirectory(prefix="kfold-ray-stage-") as d:
            tmp = Path(d) / Path(name).name
            yield tmp
            self.put_file(tmp, name)

    def delete(self, name: str) -> None:
        """Delete the file ``name`` (no error when it is already gone)."""
        try:
            self.fs.delete_file(self.path(name))
        except FileNotFoundError:
            pass

    def delete_dir(self, name: str) -> None:
        """Delete the folder ``name`` and everything in it (no error when it is gone)."""
        if self.info(name).type == pafs.FileType.Directory:
            self.fs.delete_dir(self.path(name))


@contextlib.contextmanager
def _remote_atomic(fs: pafs.FileSystem, path: str) -> Iterator[pa.NativeFile]:
    """An output stream to an object store. The object appears when the upload completes; if
    the writer fails, whatever the store may have committed is deleted again."""
    out = fs.open_output_stream(path)
    try:
        yield out
    except BaseException:
        with contextlib.suppress(Exception):
            out.close()
        with contextlib.suppress(Exception):
            fs.delete_file(path)
        raise
    out.close()
