"""JSON Lines writer: one header line, then one line per Sample (docs/schema.md).

Every line is flushed as it is written, so a recording killed at any moment
keeps every complete line (replay reports the cut-off line, if any).
"""

from __future__ import annotations

import json
from typing import Any, TextIO

from pctop.model import Header, Sample


def dumps(obj: Header | Sample | dict[str, Any]) -> str:
    """One compact JSON line (no newline). NaN/inf are refused: they are not JSON."""
    d = obj if isinstance(obj, dict) else obj.to_dict()
    return json.dumps(d, separators=(",", ":"), allow_nan=False)


class NdjsonWriter:
    def __init__(self, stream: TextIO, flush: bool = True) -> None:
        self.stream = stream
        self.flush = flush
        self.lines = 0

    def write(self, obj: Header | Sample) -> None:
        self.stream.write(dumps(obj) + "\n")
        self.lines += 1
        if self.flush:
            self.stream.flush()

    write_header = write
    write_sample = write
