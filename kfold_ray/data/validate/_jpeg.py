"""A JPEG's size and EXIF orientation read from its header bytes, without Pillow's parser.

Speed only: the image file checks (`_validate_files`) use it first and let Pillow judge every
file it does not read exactly as Pillow would.
"""

from __future__ import annotations

import struct

# ---- JPEG headers without Pillow's Python parser ------------------------------------------------
# Pillow parses a JPEG's markers in Python (~80 us per file, under the GIL): most of the time of a
# local check. This reads the same markers for the common case and gives up (None: Pillow then
# judges the same bytes) on anything it does not read exactly as Pillow would: XMP, MPO,
# Photoshop blocks, odd bytes between segments, non-8-bit or unusual layer counts, an EXIF
# orientation that is not a plain SHORT, a huge image (Pillow's decompression-bomb check).
_MORE = object()  # the bytes end before the start of scan
_SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_SKIPPED_MARKERS = frozenset({0xC4, 0xCC, 0xDC, 0xDD, 0xDF, 0xFE})  # DHT DAC DNL DRI EXP COM
_APP_NEEDS = {b"JFIF": 7, b"Adobe": 7}  # Pillow reads these bytes of such APP segments


def jpeg_header(data: bytes, max_pixels: int | None = None) -> tuple[int, int, int] | object | None:
    """(width, height, EXIF orientation or 0) of a JPEG from its bytes up to the start of scan;
    `_MORE` when ``data`` ends before it; None when Pillow should judge the file."""
    n, pos = len(data), 2
    size = exif = None
    while True:
        if pos + 4 > n:
            return _MORE
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        end = pos + 2 + ((data[pos + 2] << 8) | data[pos + 3])
        if end < pos + 4:
            return None
        if end > n:
            return _MORE
        if marker == 0xDA:  # start of scan: the header is complete
            break
        seg = data[pos + 4 : end]
        if marker in _SOF_MARKERS:
            if len(seg) < 6 or (len(seg) - 6) % 3 or seg[0] != 8 or seg[5] not in (1, 3, 4):
                return None  # Pillow reads 3 bytes per component: a ragged end fails there
            size = ((seg[3] << 8) | seg[4], (seg[1] << 8) | seg[2])
        elif marker == 0xDB:
            while seg:  # quantization tables, checked as Pillow does
                qt = 1 + (64 if seg[0] < 16 else 128)
                if len(seg) < qt:
                    return None
                seg = seg[qt:]
        elif 0xE0 <= marker <= 0xEF:
            if marker == 0xE1:
                if not seg.startswith(b"Exif\0\0") or exif is not None:
                    return None  # XMP (may carry an orientation), or a second EXIF block
                exif = seg
            elif marker == 0xE2 and (
                seg.startswith(b"MPF\0") or (seg.startswith(b"ICC_PROFILE\0") and len(seg) < 14)
            ):
                return None  # an MPO file, or an ICC piece Pillow cannot number
            elif marker == 0xED and seg.startswith(b"Photoshop 3.0\0"):
                return None
            else:
                for magic, need in _APP_NEEDS.items():
                    if seg.startswith(magic) and len(seg) < need:
                        return None
        elif marker not in _SKIPPED_MARKERS:
            return None
        pos = end
    if size is None or size[0] <= 0 or size[1] <= 0:
        return None
    if max_pixels is not None and size[0] * size[1] > max_pixels:
        return None
    orientation = _exif_orientation(exif) if exif is not None else 0
    return None if orientation is None else (size[0], size[1], orientation)


#: Byte size of each TIFF field type Pillow reads (``ImageFileDirectory_v2._load_dispatch``).
_TIFF_UNIT = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4, 16: 8}


def _exif_orientation(seg: bytes) -> int | None:
    """Tag 0x0112 of IFD0 of an APP1 EXIF block (0: none); None unless every IFD0 entry is one
    that Pillow reads in full (Pillow drops the tags after a bad one), and the orientation a
    plain SHORT."""
    tiff = seg[6:]
    if tiff[:4] == b"II*\0":
        order = "<"
    elif tiff[:4] == b"MM\0*":
        order = ">"
    else:
        return None
    try:
        (ifd,) = struct.unpack_from(order + "I", tiff, 4)
        (count,) = struct.unpack_from(order + "H", tiff, ifd)
        if ifd + 2 + 12 * count + 4 > len(tiff):
            return None
        found, data_size = 0, 0
        for k in range(count):
            at = ifd + 2 + 12 * k
            tag, kind, num, offset = struct.unpack_from(order + "HHII", tiff, at)
            size = num * _TIFF_UNIT.get(kind, 0)
            if size == 0:
                return None
            if size > 4:
                data_size += size
                if offset + size > len(tiff) or data_size > len(tiff):
                    return None
            if tag == 0x0112:
                if kind != 3 or num != 1 or found:
                    return None
                (found,) = struct.unpack_from(order + "H", tiff, at + 8)
                if not found:
                    return None
        return found
    except struct.error:
        return None
