"""MODEL.WEIGHTS: fetched once on the driver (a path, a URI or a Detectron2 URL), then read by
every fold from the run's storage."""

from __future__ import annotations

import contextlib
import io
import logging
import socket
from pathlib import Path

from ..storage._storage import is_uri


def fetch_weights_file(spec: str) -> Path:
    """A local file for a MODEL.WEIGHTS value: a path, a URI (s3://...) or a Detectron2 URL."""
    from detectron2.utils.file_io import PathManager

    if spec.startswith("file://"):
        spec = spec[len("file://"):]
    if not is_uri(spec):
        path = Path(spec).expanduser().absolute()
        if not path.is_file():
            raise FileNotFoundError(f"no such file {path}")
        return path
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(30)  # an unreachable host must fail within seconds, not hang
    quiet = logging.getLogger("iopath")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)  # the failure is reported once, by us, as one line
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # iopath's download progress bar
            return Path(PathManager.get_local_path(spec))
    finally:
        socket.setdefaulttimeout(previous)
        quiet.setLevel(level)


def local_weights(weights: str, scratch: Path) -> str | None:
    """The weights the driver placed in the run's storage, copied to this node (None: config's)."""
    if not weights:
        return None
    if not is_uri(weights):
        return weights
    from ._files import download

    return str(download(weights, scratch / "weights"))
