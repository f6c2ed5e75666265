"""Where the json and the images are: locations (absolute paths or URIs) and store lookups.

Every message names a file by its location; these helpers join and split locations (a URI's
``?query`` stays last), mask credentials given in a query, and turn a store that cannot be
reached, or a missing bucket, into one `StorageError` line instead of pyarrow's traceback.
"""

from __future__ import annotations

import os
import posixpath
import re

import pyarrow as pa
import pyarrow.fs as pafs

from .._exceptions import StorageError, one_line
from ._storage import is_uri

# ---- storage ----------------------------------------------------------------------------------
# The annotations json and the images may sit on a local disk (or a mount) or behind any
# ``pyarrow.fs`` filesystem (an object store): local files are read with plain os calls, the
# others through the filesystem; every message names the file by its absolute path or URI.
_CREDENTIAL_IN_QUERY = re.compile(r"((?:secret_key|session_token|access_key)=)[^&#]*", re.I)
_MISSING_BUCKET_FS = frozenset({"s3", "gcs"})  # stores whose first path component is a bucket


def shown(location: str) -> str:
    """``location`` for messages: credentials given in a URI's ``?query`` are masked."""
    return _CREDENTIAL_IN_QUERY.sub(r"\1***", location) if "?" in location else location


def _split_query(location: str) -> tuple[str, str]:
    if "?" in location and is_uri(location):
        base, query = location.split("?", 1)
        return base, "?" + query
    return location, ""


def join(root: str, name: str) -> str:
    """``root/name`` for a folder path, filesystem path or URI (a URI's ``?query`` stays last).

    ``name`` is relative (checked by `parse_images`); one with ``.`` or empty parts is
    normalized, as a local OS would resolve it and as object keys are usually written.
    """
    if "./" in name or "//" in name or name.endswith(("/", ".")):
        name = posixpath.normpath(name)
    base, query = _split_query(root)
    return f"{base.rstrip('/')}/{name}{query}"


def parent(location: str) -> str:
    """The folder of a file's absolute path or URI."""
    base, query = _split_query(location)
    if not is_uri(base):
        return os.path.dirname(base) or "/"
    return base.rstrip("/").rsplit("/", 1)[0] + query


def _missing_bucket(fs: pafs.FileSystem, path: str) -> str | None:
    """The bucket of ``path`` if the store has no such bucket (else None: the key is missing)."""
    if fs.type_name not in _MISSING_BUCKET_FS:
        return None
    bucket = path.split("/", 1)[0]
    try:
        return bucket if fs.get_file_info(bucket).type == pafs.FileType.NotFound else None
    except (OSError, pa.ArrowException):
        return None


def remote_info(fs: pafs.FileSystem, path: str, what: str, location: str) -> pafs.FileInfo:
    """``fs.get_file_info(path)``; StorageError (one line naming ``location``) when the store
    cannot be reached (credentials, endpoint, network) or the bucket does not exist."""
    try:
        info = fs.get_file_info(path)
    except (OSError, pa.ArrowException) as e:
        raise StorageError(f"{what} {shown(location)}: cannot read the storage ({one_line(e)[:300]}); "
                           "check its credentials and endpoint") from None  # fmt: skip
    if info.type == pafs.FileType.NotFound and (bucket := _missing_bucket(fs, path)):
        raise StorageError(f"{what} {shown(location)}: bucket {bucket!r} does not exist")
    return info
