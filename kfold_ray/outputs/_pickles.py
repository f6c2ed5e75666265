"""Pickle streams of millions of small numpy arrays, written with numpy in bulk.

cleanlab's object-detection inputs are nested lists of small arrays: at COCO-train scale ~6.8M
prediction arrays and ~240k label arrays. ``pickle.dump`` reduces each array on its own (~10 us
apiece: over a minute). Here every array is a slice of one big base array, and the stream says so:
the base is pickled once, and each small array is a fixed-size record meaning
``operator.getitem(base, slice(start, stop))``. Records have a fixed size, so whole blocks of them
are byte matrices filled by numpy.

``pickle.load`` of such a stream needs only numpy (kfold-ray is not imported) and returns plain
nested lists / dicts of ndarrays: views of the base, C-contiguous, writeable. Loading is faster too
(one slice per array instead of one array reconstruction).

The opcodes are standard pickle protocol 5 ones (see the standard library's ``pickletools``).
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

__all__ = ["dump_nested_slices", "dump_dict_slices"]

_IMAGE_CHUNK = 4096  # outer items per block: blocks stay well under glibc's 32 MB mmap threshold

_PROTO5 = b"\x80\x05"
_STACK_GLOBAL, _REDUCE, _TUPLE2, _POP = b"\x93", b"R", b"\x86", b"0"
_EMPTY_LIST, _EMPTY_DICT, _MARK = b"]", b"}", b"("
_APPENDS, _SETITEMS, _STOP = b"e", b"u", b"."
_BYTEARRAY8 = b"\x96"
_GETITEM, _SLICE = 0, 1  # memo slots of operator.getitem and builtins.slice


class _Writable(Protocol):
    def write(self, data: Any) -> Any: ...


def _unicode(s: str) -> bytes:
    raw = s.encode()
    return b"\x8c" + bytes([len(raw)]) + raw  # SHORT_BINUNICODE


def _global(module: str, name: str) -> bytes:
    return _unicode(module) + _unicode(name) + _STACK_GLOBAL


def _put(slot: int) -> bytes:
    return b"q" + bytes([slot]) + _POP  # BINPUT then POP: store in the memo, leave the stack


def _get(slot: int) -> bytes:
    return b"h" + bytes([slot])  # BINGET


def _binint(v: int) -> bytes:
    return b"J" + int(v).to_bytes(4, "little", signed=True)


def _prelude(f: _Writable) -> None:
    f.write(_PROTO5)
    f.write(_global("operator", "getitem") + _put(_GETITEM))
    f.write(_global("builtins", "slice") + _put(_SLICE))


def _base(f: _Writable, slot: int, array: np.ndarray) -> None:
    """memo[slot] = numpy.reshape(numpy.frombuffer(bytearray(...), dtype), (-1, *array.shape[1:]))."""
    raw = np.ascontiguousarray(array)
    dtype = raw.dtype.newbyteorder("<") if raw.dtype.byteorder == ">" else raw.dtype
    raw = raw.astype(dtype, copy=False)
    f.write(_global("numpy", "reshape") + _global("numpy", "frombuffer"))
    f.write(_BYTEARRAY8 + raw.nbytes.to_bytes(8, "little"))
    f.write(raw.reshape(-1).view(np.uint8))  # no copy
    f.write(_unicode(dtype.str) + _TUPLE2 + _REDUCE)
    shape = (-1, *raw.shape[1:])
    f.write(b"(" + b"".join(_binint(d) for d in shape) + b"t")  # MARK ints TUPLE
    f.write(_TUPLE2 + _REDUCE + _put(slot))


def _slice_record(base_slot: int) -> np.ndarray:
    """getitem(base, slice(start, stop)): 20 bytes, int32 start at byte 7, stop at byte 12."""
    rec = _get(_GETITEM) + _get(base_slot) + _get(_SLICE) + _binint(0) + _binint(0)
    return np.frombuffer(rec + _TUPLE2 + _REDUCE + _TUPLE2 + _REDUCE, dtype=np.uint8)


def _check_stop(stop: int) -> None:
    if stop >= 2**31:
        raise ValueError(f"{stop} rows: more than these pickles support (2**31)")


def dump_nested_slices(f: _Writable, data: np.ndarray, counts: np.ndarray, n: int, c: int) -> None:
    """Pickle ``[[data[s:e] for each of c entries] for each of n items]`` into ``f``.

    ``counts`` is int (n * c,) rows of each entry, in order (``data`` rows are grouped that way).
    Every empty entry is one shared ``numpy.empty((0, *data.shape[1:]), data.dtype)``.
    """
    base, empty = 2, 3
    _check_stop(int(data.shape[0]))
    _prelude(f)
    _base(f, base, data)
    f.write(_global("numpy", "empty") + b"(" + b"".join(_binint(d) for d in (0, *data.shape[1:])))
    dtype = np.dtype(data.dtype).newbyteorder("<").str
    f.write(b"t" + _unicode(dtype) + _TUPLE2 + _REDUCE + _put(empty))
    f.write(_EMPTY_LIST + _MARK)
    ends = np.cumsum(counts)
    record = _slice_record(base)
    for lo in range(0, n, _IMAGE_CHUNK):
        hi = min(n, lo + _IMAGE_CHUNK)
        span = slice(lo * c, hi * c)
        f.write(_nested_block(counts[span], ends[span], hi - lo, c, record, _get(empty)))
    f.write(_APPENDS + _STOP)


def _nested_block(
    counts: np.ndarray, ends: np.ndarray, m: int, c: int, record: np.ndarray, empty: bytes
) -> bytes:
    """``m`` items' lists, as one byte matrix with a mask of the bytes used (empty entries: 2)."""
    w = record.size
    entries = np.empty((m, c, w), dtype=np.uint8)
    entries[:] = record
    entries[:, :, 7:11] = (ends - counts).astype("<i4").view(np.uint8).reshape(m, c, 4)
    entries[:, :, 12:16] = ends.astype("<i4").view(np.uint8).reshape(m, c, 4)
    is_empty = (counts == 0).reshape(m, c)
    entries[is_empty, :2] = np.frombuffer(empty, dtype=np.uint8)
    rows = np.empty((m, 2 + c * w + 1), dtype=np.uint8)
    rows[:, 0], rows[:, 1], rows[:, -1] = ord("]"), ord("("), ord("e")  # one list per item
    rows[:, 2:-1] = entries.reshape(m, c * w)
    used = np.ones((m, c, w), dtype=bool)
    used[is_empty, 2:] = False
    keep = np.ones((m, 2 + c * w + 1), dtype=bool)
    keep[:, 2:-1] = used.reshape(m, c * w)
    return rows[keep].tobytes()


def dump_dict_slices(
    f: _Writable, arrays: dict[str, np.ndarray], starts: np.ndarray, ends: np.ndarray
) -> None:
    """Pickle ``[{key: arrays[key][s:e] for key in arrays} for s, e in zip(starts, ends)]``."""
    for a in arrays.values():
        _check_stop(int(a.shape[0]))
    _prelude(f)
    record = b""
    for j, (key, array) in enumerate(arrays.items()):
        base, name = 2 + 2 * j, 3 + 2 * j
        _base(f, base, array)
        f.write(_unicode(key) + _put(name))
        record += _get(name) + _slice_record(base).tobytes()
    template = np.frombuffer(_EMPTY_DICT + _MARK + record + _SETITEMS, dtype=np.uint8)
    f.write(_EMPTY_LIST + _MARK)
    starts = np.asarray(starts).astype("<i4")
    ends = np.asarray(ends).astype("<i4")
    for lo in range(0, starts.size, _IMAGE_CHUNK):
        s, e = starts[lo : lo + _IMAGE_CHUNK], ends[lo : lo + _IMAGE_CHUNK]
        rows = np.empty((s.size, template.size), dtype=np.uint8)
        rows[:] = template
        for j in range(len(arrays)):
            at = 2 + 22 * j + 2 + 7  # dict opener, earlier keys' records, key BINGET, then start
            rows[:, at : at + 4] = s.view(np.uint8).reshape(-1, 4)
            rows[:, at + 5 : at + 9] = e.view(np.uint8).reshape(-1, 4)
        f.write(rows.tobytes())
    f.write(_APPENDS + _STOP)
