"""Decode only the rows of a JPEG that a crop needs.

A random resized crop keeps on average about 3/4 of an image's rows, yet a decoder decodes them all. libjpeg-turbo
can skip rows, but no Python binding of it exposes that (nor cropped decoding: Pillow, torchvision and simplejpeg
decode whole images). Restart markers make it possible from outside: a JPEG written with a restart marker at every
row of MCUs (ITU-T T.81, B.2.4.4 DRI and B.2.1 RSTm; `ssvit.prepare` writes them, Pillow's
``restart_marker_rows=1``) has entropy-coded rows that decode independently, so the rows [r0, r1) alone, under
the same header with the frame's height set to theirs and the restart markers renumbered from 0, form a valid
JPEG of that band: decoding it costs what its rows cost.

Only what this file can read exactly is cut: baseline or extended sequential Huffman JPEGs (SOF0/SOF1) with one
interleaved scan and a restart interval that divides a row of MCUs. Anything else (progressive, no restart
markers, several scans) is decoded whole by the caller. The band keeps one MCU row of margin where the crop
would otherwise touch the band's first or last pixel row, because libjpeg's chroma upsampling looks one chroma
row beyond: with it, the crop's pixels are bit-identical to a whole decode's (tested).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Optional

_RST = re.compile(rb"\xff[\xd0-\xd7]")
_SEQUENTIAL_HUFFMAN = (0xC0, 0xC1)
_OTHER_FRAMES = {0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}  # progressive, lossless, arithmetic


@dataclass(frozen=True)
class Layout:
    height: int
    width: int
    sof: int  # offset of the SOF marker (its height field is at sof + 5)
    scan: int  # offset of the first entropy-coded byte
    mcu_height: int
    mcu_rows: int
    markers_per_row: int  # restart intervals per MCU row


def layout(data) -> Optional[Layout]:
    """Where a JPEG's rows of MCUs lie, or None when this file cannot cut it into bands."""
    try:
        return _layout(data)
    except IndexError:  # a segment shorter than its fields: not ours to cut (the decoder will say what is wrong)
        return None


def _layout(data) -> Optional[Layout]:
    pos, end, sof, restart, factors = 2, len(data), None, 0, []
    if data[:2] != b"\xff\xd8":
        return None
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if pos + 2 + length > end:  # a truncated segment
            return None
        if marker in _OTHER_FRAMES:
            return None
        if marker in _SEQUENTIAL_HUFFMAN:
            sof = pos
            height, width = int.from_bytes(data[pos + 5 : pos + 7], "big"), int.from_bytes(data[pos + 7 : pos + 9], "big")
            factors = [(data[pos + 11 + 3 * k] >> 4, data[pos + 11 + 3 * k] & 15) for k in range(data[pos + 9])]
        elif marker == 0xDD:  # DRI: the restart interval, in MCUs
            restart = int.from_bytes(data[pos + 4 : pos + 6], "big")
        elif marker == 0xDA:  # SOS: the entropy-coded data follows the segment
            if sof is None or not restart or not height or data[pos + 4] != len(factors):
                return None
            # One component: its MCU is one 8x8 block; interleaved: Hmax x Vmax blocks (T.81, A.2).
            h_max, v_max = (1, 1) if len(factors) == 1 else (max(f[0] for f in factors), max(f[1] for f in factors))
            per_row = math.ceil(width / (8 * h_max))
            if per_row % restart:
                return None
            return Layout(height, width, sof, pos + 2 + length, 8 * v_max, math.ceil(height / (8 * v_max)), per_row // restart)
        pos += 2 + length
    return None


def band(data, lay: Layout, top: int, bottom: int) -> tuple[bytes, int, int]:
    """A JPEG of the pixel rows [top, bottom) with their margin: (its bytes, the original row it starts at, its
    height). The whole image when the band would be all of it or the markers are not as DRI promises."""
    r0 = max(0, (top - 1) // lay.mcu_height) if top else 0
    r1 = min(lay.mcu_rows, math.ceil((bottom + 1) / lay.mcu_height))
    if r0 == 0 and r1 == lay.mcu_rows:
        return data, 0, lay.height
    first, last = r0 * lay.markers_per_row, r1 * lay.markers_per_row - 1  # the band's restart intervals
    intervals, markers = lay.mcu_rows * lay.markers_per_row, []
    for m in _RST.finditer(data, lay.scan):  # marker n is RST(n mod 8) and ends interval n
        if data[m.start() + 1] != 0xD0 + len(markers) % 8:
            return data, 0, lay.height  # a marker is missing: the data is not as DRI says
        markers.append(m.start())
        if len(markers) > last:  # none after the band's last is needed
            break
    if len(markers) < min(last + 1, intervals - 1):
        return data, 0, lay.height
    start = lay.scan if first == 0 else markers[first - 1] + 2
    if last < intervals - 1:
        stop = markers[last]
    else:  # the band reaches the image's end: up to EOI
        tail = bytes(data[-4096:])
        if tail.rfind(b"\xff\xd9") < 0:
            return data, 0, lay.height
        stop = len(data) - len(tail) + tail.rfind(b"\xff\xd9")
    height = min(lay.height, r1 * lay.mcu_height) - r0 * lay.mcu_height
    head = bytearray(data[: lay.scan])
    head[lay.sof + 5 : lay.sof + 7] = height.to_bytes(2, "big")
    body = memoryview(data)[start:stop]
    if first % 8:  # the decoder expects RST0, RST1, ... from the scan's start
        body = bytearray(body)
        for n in range(first, last):
            body[markers[n] - start + 1] = 0xD0 + (n - first) % 8
    return b"".join((head, body, b"\xff\xd9")), r0 * lay.mcu_height, height
