"""The images section of a COCO json once parsed: what every later check reads (the json's
boxes, the files on disk, the masks)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class ImageTable:
    ids: np.ndarray  # int64 (N,), file order
    file_names: tuple[str, ...]
    widths: np.ndarray
    heights: np.ndarray
    extras: tuple[dict[str, Any], ...]
    #: bool (N,): the file name is valid (its file can be checked); None: all are.
    name_ok: np.ndarray | None = None
    #: bool (N,): width and height are valid (boxes and the file can be checked against them).
    size_ok: np.ndarray | None = None

    def take(self, keep: np.ndarray) -> "ImageTable":
        """The images where the bool mask ``keep`` is set."""
        names = tuple(n for n, k in zip(self.file_names, keep.tolist()) if k)
        extras = tuple(e for e, k in zip(self.extras, keep.tolist()) if k)
        return ImageTable(self.ids[keep], names, self.widths[keep], self.heights[keep], extras)
