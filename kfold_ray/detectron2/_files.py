"""Detectron2 reads every file through iopath's PathManager; this handler lets it read URIs.

With it, a dataset dict's ``file_name`` (and ``MODEL.WEIGHTS``) may be an ``s3://``, ``gs://``,
``hdfs://`` ... URI that ``pyarrow.fs`` opens, with the node's own credentials: the training
loader, our batched inference loader and the checkpointer read images and weights the same way on
every node. Local paths are untouched (iopath's native handler).
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from pathlib import Path
from typing import Any

# The schemes pyarrow's FileSystem.from_uri opens (file:// is left to iopath's own handler).
SCHEMES = ("s3://", "gs://", "gcs://", "hdfs://", "viewfs://", "abfs://", "abfss://")


def register() -> None:
    """Register the handler with Detectron2's PathManager (idempotent; per process)."""
    from detectron2.utils.file_io import PathManager
    from iopath.common.file_io import PathHandler

    if getattr(PathManager, "_kfold_ray_uri_handler", False):
        return

    class PyArrowHandler(PathHandler):
        def _get_supported_prefixes(self) -> list[str]:
            return list(SCHEMES)

        def _open(self, path: str, mode: str = "r", buffering: int = -1, **kwargs: Any):
            self._check_kwargs(kwargs)
            if "r" not in mode or "+" in mode:
                raise ValueError(f"{path}: kfold-ray reads URIs only (mode {mode!r})")
            fs, p = _open_fs(path)
            with fs.open_input_stream(p) as f:
                data = f.read()
            return io.BytesIO(data) if "b" in mode else io.StringIO(data.decode("utf-8"))

        def _exists(self, path: str, **kwargs: Any) -> bool:
            import pyarrow.fs as pafs

            fs, p = _open_fs(path)
            return fs.get_file_info(p).type != pafs.FileType.NotFound

        def _isfile(self, path: str, **kwargs: Any) -> bool:
            import pyarrow.fs as pafs

            fs, p = _open_fs(path)
            return fs.get_file_info(p).type == pafs.FileType.File

        def _get_local_path(self, path: str, force: bool = False, **kwargs: Any) -> str:
            return str(download(path))

    PathManager.register_handler(PyArrowHandler())
    PathManager._kfold_ray_uri_handler = True


def _open_fs(uri: str):
    """(filesystem, path) of a file URI; the filesystem is opened once per folder and process
    (opening one per image would cost a region lookup per image on AWS)."""
    from ..data._dataset import open_image_root

    parent, name = uri.rstrip("/").rsplit("/", 1)
    fs, root = open_image_root(parent)
    return fs, f"{root}/{name}"


def download(uri: str, cache: str | os.PathLike[str] | None = None) -> Path:
    """A local copy of ``uri`` (cached per process user by URI)."""
    from ..storage._storage import Storage

    folder = Path(cache or Path(tempfile.gettempdir()) / "kfold-ray-cache")
    local = folder / hashlib.sha1(uri.encode()).hexdigest()[:16] / uri.rstrip("/").rsplit("/", 1)[-1]
    if not local.is_file():
        parent, name = uri.rstrip("/").rsplit("/", 1)
        Storage(parent, what="file").get_file(name, local)
    return local
