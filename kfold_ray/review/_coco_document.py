"""The dataset's COCO json as its own objects: what the COCO export copies records from, and what
`_apply` edits (every record it does not touch stays the same object, in the same order)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .._exceptions import ConfigError, DatasetError
from ..data.validate._json import read_document
from ..storage._locations import shown
from ..storage._storage import is_uri, open_location


def read_coco_document(location: str | os.PathLike[str]) -> tuple[dict[str, Any], str]:
    """The COCO json's parsed top-level object (a path or a URI) and its location as messages
    show it; DatasetError naming the file when it cannot be read or is not a JSON object."""
    fs, path, where = open_location(os.fspath(location), what="annotations")
    _, doc = read_document(fs, path, where)
    return doc, shown(where)


def records_by_id(doc: dict[str, Any], section: str) -> dict[int, dict[str, Any]]:
    """``{id: record}`` of a section whose records `load_coco` has checked (ids are unique ints)."""
    return {int(r["id"]): r for r in doc.get(section) or [] if isinstance(r, dict) and "id" in r}


def write_json_file(out: str | os.PathLike[str], doc: Any, *, indent: int | None = None) -> Path:
    """``doc`` as JSON at the local path ``out``, atomically (a crash leaves no half file)."""
    from ..storage._atomic import write_text

    out = os.fspath(out)
    if is_uri(out):
        raise ConfigError(f"--out {out!r}: give a local path (review files are opened by local tools)")
    path = Path(out).absolute()
    if path.is_dir():
        raise ConfigError(f"--out {out}: is a folder; give a file name")
    if not path.parent.is_dir():
        raise ConfigError(f"--out {out}: its folder {path.parent} does not exist")
    write_text(path, json.dumps(doc, ensure_ascii=False, indent=indent) + "\n")
    return path


def fail(path: str, message: str) -> DatasetError:
    """The one-line error for an item of a fixes file: ``<file>: <item>: <problem>``."""
    return DatasetError(message, path=path)
