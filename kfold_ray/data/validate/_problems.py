"""Messages and the problem collector shared by every validation check.

A problem is one line that names the record at fault (`_at`: ``images[2] (id 9)``) and shows the
json value as the json spells it (`show`); `Problems` gathers them across the checks, in check
order, so that one `DatasetError` can list them all. `_Records` lets a section's checks report
in record order however they were found (vectorized or one by one).
"""

from __future__ import annotations

import json
from typing import Any, Callable

import numpy as np

from ..._exceptions import DatasetError

_MISSING = object()  # a json key that is absent (None is json's null)
_JSON_TYPE = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array",
              dict: "object", type(None): "null"}  # fmt: skip


# ---- messages ---------------------------------------------------------------------------------
def show(value: Any, limit: int = 60) -> str:
    """``value`` as the json spells it, on one line, shortened to about ``limit`` characters."""
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    text = " ".join(text.splitlines())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _kind(value: Any) -> str:
    return _JSON_TYPE.get(type(value), type(value).__name__)


def _at(section: str, i: int, item: Any) -> str:
    """``images[2] (id 9)``: the record's position, and its id when it has a valid one."""
    rid = item.get("id") if isinstance(item, dict) else None
    return f"{section}[{i}] (id {rid})" if type(rid) is int else f"{section}[{i}]"


def _fail(path: str, section: str, i: int, item: Any, problem: str) -> DatasetError:
    return DatasetError(f"{_at(section, i, item)}: {problem}", path=path)


# ---- collecting problems ----------------------------------------------------------------------
MAX_PROBLEMS = DatasetError.MAX_PROBLEMS


class Problems:
    """The problems found so far, in check order: the first `MAX_PROBLEMS` as lines
    (``"<file>: <problem>"``), the first one's message and file, and how many in all."""

    def __init__(self) -> None:
        self.first: tuple[str, str] | None = None
        self.lines: list[str] = []
        self.count = 0

    def __bool__(self) -> bool:
        return self.count > 0

    @property
    def room(self) -> int:
        return max(0, MAX_PROBLEMS - len(self.lines))

    def add(self, message: str, path: str) -> None:
        self.count += 1
        if self.first is None:
            self.first = (message, path)
        if len(self.lines) < MAX_PROBLEMS:
            self.lines.append(f"{path}: {message}")

    def error(self) -> DatasetError:
        assert self.first is not None
        message, path = self.first
        return DatasetError(message, path=path, problems=self.lines, problem_count=self.count)

    def raise_if_any(self) -> None:
        if self:
            raise self.error()


class _Records:
    """Problems of one section's records, found check by check (a check may be vectorized:
    ``add(rows, problem_of_row)``) and reported in record order, then check order. Messages are
    only built for the problems that are shown."""

    def __init__(self, section: str, items: list, path: str) -> None:
        self.section, self.items, self.path = section, items, path
        self._batches: list[tuple[np.ndarray, int, Any]] = []  # (rows, check number, row -> problem)
        self._singles: list[tuple[int, int, str]] = []  # (row, check number, problem)
        self._checks = 0

    def add(self, rows: Any, problem: Callable[[int], str]) -> None:
        """``problem(i) -> str`` for each row ``i`` of ``rows`` (an index array or a bool mask)."""
        rows = np.asarray(rows)
        rows = np.flatnonzero(rows) if rows.dtype == bool else rows.astype(np.int64).reshape(-1)
        if rows.size:
            self._batches.append((rows, self._checks, problem))
        self._checks += 1

    def one(self, i: int, problem: str) -> None:
        self._singles.append((i, self._checks, problem))
        self._checks += 1

    def __bool__(self) -> bool:
        return bool(self._singles or self._batches)

    def report(self, problems: Problems) -> None:
        if not self:
            return
        rows = np.concatenate([b[0] for b in self._batches] + [np.array([s[0] for s in self._singles], np.int64)])
        check = np.concatenate([np.full(b[0].size, b[1], np.int64) for b in self._batches]
                               + [np.array([s[1] for s in self._singles], np.int64)])
        which = np.concatenate([np.full(b[0].size, k, np.int64) for k, b in enumerate(self._batches)]
                               + [-1 - np.arange(len(self._singles), dtype=np.int64)])
        order = np.lexsort((check, rows))
        shown_now = order[: problems.room]
        for j in shown_now.tolist():
            i, w = int(rows[j]), int(which[j])
            text = self._batches[w][2](i) if w >= 0 else self._singles[-1 - w][2]
            problems.add(f"{_at(self.section, i, self.items[i])}: {text}", self.path)
        problems.count += int(order.size - shown_now.size)


def _report(found: _Records, problems: Problems | None) -> None:
    """``found`` into ``problems``; when None (a section checked on its own), raised here."""
    if problems is None:
        own = Problems()
        found.report(own)
        own.raise_if_any()
    else:
        found.report(problems)
