"""PNG chunk reading and writing: just enough for the card text chunks.

A card PNG is an ordinary image with `tEXt` chunks whose keyword is `chara`
(V2) or `ccv3` (V3). Pillow would read the text too, but it forgives truncated
files and hides which chunk is broken; a card importer must say exactly what is
wrong, so we walk the chunks ourselves and check each CRC.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CARD_KEYWORDS = ("chara", "ccv3")
_HEADER = struct.Struct(">I4s")
MAX_TEXT_BYTES = 16 * 1024 * 1024  # a compressed text chunk may not inflate past this (the card size limit)


class PngError(ValueError):
    """The bytes are not a well-formed PNG; the message says where it breaks."""


@dataclass(frozen=True)
class Chunk:
    type: bytes
    data: bytes

    def encode(self) -> bytes:
        crc = zlib.crc32(self.type + self.data) & 0xFFFFFFFF
        return _HEADER.pack(len(self.data), self.type) + self.data + struct.pack(">I", crc)


def read_chunks(blob: bytes) -> list[Chunk]:
    """All chunks up to IEND; raises PngError on truncation or corruption."""
    if not blob.startswith(PNG_SIGNATURE):
        raise PngError("not a PNG file (bad signature)")
    chunks: list[Chunk] = []
    pos = len(PNG_SIGNATURE)
    while True:
        if pos + _HEADER.size > len(blob):
            raise PngError(f"truncated PNG: file ends at byte {len(blob)} before the IEND chunk")
        length, ctype = _HEADER.unpack_from(blob, pos)
        end = pos + _HEADER.size + length + 4
        if end > len(blob):
            name = ctype.decode("latin-1", "replace")
            raise PngError(f"truncated PNG: chunk {name!r} runs past the end of the file")
        data = blob[pos + _HEADER.size : end - 4]
        (crc,) = struct.unpack_from(">I", blob, end - 4)
        if crc != zlib.crc32(ctype + data) & 0xFFFFFFFF:
            raise PngError(f"corrupt PNG: bad CRC in chunk {ctype.decode('latin-1', 'replace')!r}")
        chunks.append(Chunk(ctype, data))
        pos = end
        if ctype == b"IEND":
            return chunks


def text_chunks(chunks: list[Chunk], limit: int = MAX_TEXT_BYTES) -> dict[str, str]:
    """Keyword -> text of the tEXt and (uncompressed or zlib) iTXt chunks.

    Raises PngError on a malformed iTXt chunk, or one that inflates past `limit` bytes (a zlib bomb
    is stopped at the limit, never inflated whole).
    """
    texts: dict[str, str] = {}
    for chunk in chunks:
        if chunk.type == b"tEXt" and b"\0" in chunk.data:
            key, _, value = chunk.data.partition(b"\0")
            texts[key.decode("latin-1")] = value.decode("latin-1")
        elif chunk.type == b"iTXt" and b"\0" in chunk.data:
            key, _, rest = chunk.data.partition(b"\0")
            name = key.decode("latin-1")
            if len(rest) < 2:
                raise PngError(f"corrupt PNG: iTXt chunk {name!r} ends before its text")
            compressed, rest = rest[0], rest[2:]
            _lang, _, rest = rest.partition(b"\0")
            _translated, _, value = rest.partition(b"\0")
            if compressed:
                value = _inflate(value, limit, name)
            try:
                texts[name] = value.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise PngError(f"corrupt PNG: iTXt chunk {name!r} is not UTF-8 ({exc.reason})") from None
    return texts


def _inflate(data: bytes, limit: int, name: str) -> bytes:
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(data, limit)
    except zlib.error as exc:
        raise PngError(f"corrupt PNG: iTXt chunk {name!r} has broken compressed text ({exc})") from None
    if inflater.unconsumed_tail:
        raise PngError(f"iTXt chunk {name!r} inflates to more than {limit} bytes")
    return out


def without_card_chunks(chunks: list[Chunk]) -> list[Chunk]:
    """The image's chunks with any card text removed (what we keep as the avatar)."""
    def is_card(chunk: Chunk) -> bool:
        if chunk.type not in (b"tEXt", b"iTXt", b"zTXt"):
            return False
        return chunk.data.partition(b"\0")[0].decode("latin-1") in CARD_KEYWORDS

    return [c for c in chunks if not is_card(c)]


def encode(chunks: list[Chunk]) -> bytes:
    return PNG_SIGNATURE + b"".join(c.encode() for c in chunks)


def with_text(chunks: list[Chunk], texts: dict[str, str]) -> bytes:
    """Encode the image with `texts` as tEXt chunks just before IEND."""
    body = [c for c in without_card_chunks(chunks) if c.type != b"IEND"]
    extra = [Chunk(b"tEXt", k.encode("latin-1") + b"\0" + v.encode("latin-1")) for k, v in texts.items()]
    return encode([*body, *extra, Chunk(b"IEND", b"")])
