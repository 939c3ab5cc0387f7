"""A reader for MXNet RecordIO image packs, so the crater data needs no MXNet install.

Layout (dmlc-core recordio, MXNet `recordio.pack`): each part is a u32 magic, a u32 `lrecord` whose low
29 bits are the part's length and top 3 bits a continuation flag (0 whole record; 1 first, 2 middle,
3 last part of a record that the writer split where its payload contained the magic, dropping that
magic), then the part zero-padded to a multiple of 4 bytes. A record's payload is an IRHeader
(u32 flag, f32 label, u64 id, u64 id2), then `flag` float32 labels if flag > 0, then the image bytes.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_PART_HEADER = struct.Struct("<II")
_IR_HEADER = struct.Struct("<IfQQ")
_LENGTH_MASK = (1 << 29) - 1


class RecordIOError(ValueError):
    """The file is not valid RecordIO; the message names the file and the byte offset."""


def iter_records(path: str | Path) -> Iterator[tuple[float, bytes]]:
    """Yield (label, image bytes) per record.

    When the IRHeader carries a label vector (flag > 0) the header's scalar label is unused by MXNet,
    so the first element of that vector is yielded as the label.
    """
    for offset, payload in _iter_payloads(Path(path)):
        if len(payload) < _IR_HEADER.size:
            raise RecordIOError(
                f"{path}: record at byte {offset} has {len(payload)} bytes, "
                f"fewer than the {_IR_HEADER.size}-byte IRHeader"
            )
        flag, label, _id, _id2 = _IR_HEADER.unpack_from(payload)
        body = payload[_IR_HEADER.size :]
        if flag > 0:
            if len(body) < 4 * flag:
                raise RecordIOError(
                    f"{path}: record at byte {offset} declares {flag} labels but has only {len(body)} bytes"
                )
            label = struct.unpack_from("<f", body)[0]
            body = body[4 * flag :]
        yield label, body


def _iter_payloads(path: Path) -> Iterator[tuple[int, bytes]]:
    """Yield (byte offset of the record's first part, payload), rejoining split records."""
    parts: list[bytes] = []
    start = 0
    with path.open("rb") as stream:
        while True:
            offset = stream.tell()
            head = stream.read(_PART_HEADER.size)
            if not head:
                if parts:
                    raise RecordIOError(f"{path}: file ends inside the split record started at byte {start}")
                return
            if len(head) < _PART_HEADER.size:
                raise RecordIOError(f"{path}: truncated record header at byte {offset}")
            magic, lrecord = _PART_HEADER.unpack(head)
            if magic != MAGIC:
                raise RecordIOError(
                    f"{path}: bad magic 0x{magic:08x} at byte {offset} (expected 0x{MAGIC:08x}); "
                    "not an MXNet RecordIO file, or corrupt"
                )
            cflag, length = lrecord >> 29, lrecord & _LENGTH_MASK
            if (cflag in (0, 1)) == bool(parts):
                raise RecordIOError(f"{path}: continuation flag {cflag} out of sequence at byte {offset}")
            data = stream.read(length)
            if len(data) < length:
                raise RecordIOError(
                    f"{path}: record at byte {offset} is truncated ({len(data)} of {length} bytes)"
                )
            stream.seek(-length % 4, 1)
            if not parts:
                start = offset
            parts.append(data)
            if cflag in (0, 3):
                yield start, _MAGIC_BYTES.join(parts)
                parts = []
