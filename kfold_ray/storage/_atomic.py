"""Atomic file writes: a crash never leaves a final-named file half written.

Every file kfold-ray puts in a run dir goes through `atomic_path`: the content is written to a
temporary name in the same folder, flushed to disk, then renamed over the final name (rename is
atomic within one filesystem).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; on clean exit, fsync it and rename it to ``final``.

    On an exception the temporary file is removed and ``final`` is left untouched. The file's
    mode follows the umask, like any new file (mkstemp's 0600 would keep a team on shared
    storage out of the run).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes(final: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(final) as tmp:
        tmp.write_bytes(data)


def write_text(final: str | os.PathLike[str], text: str) -> None:
    write_bytes(final, text.encode("utf-8"))


def write_json(final: str | os.PathLike[str], obj: Any, *, indent: int | None = 2) -> None:
    write_text(final, json.dumps(obj, indent=indent, ensure_ascii=False, allow_nan=False) + "\n")
