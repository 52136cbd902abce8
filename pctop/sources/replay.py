"""An NDJSON recording read back as Samples (`pctop replay`, and the TUI's playback).

`Recording` is an indexable list of Samples that loads incrementally: each
`load_more()` parses the complete lines appended since the last call, so a
recording still being written can be followed. A line that is not a valid
record stops loading with a `RecordingError` naming the file and line, and
everything before it stays available (`recording.samples`, `recording.error`).

Format: the first line is the header (type "header"); then lines of type
"sample". Lines of an unknown type are skipped (newer writers may add
types); a second header, a header newer than this pctop's schema, or a line
that is not a JSON object is an error.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

from pctop.model import SCHEMA_VERSION, Header, Sample


class RecordingError(ValueError):
    """A recording that cannot be read further; the message is one line."""


def parse_record(text: str, where: str) -> Header | Sample | None:
    """One line -> Header or Sample; None for a blank line or an unknown type."""
    if not text.strip():
        return None
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        why = e.msg.lower().removesuffix(" at")
        raise RecordingError(f"{where}: not valid JSON: {why} at column {e.colno}") from None
    if not isinstance(d, dict):
        raise RecordingError(f"{where}: expected a JSON object, got {type(d).__name__}")
    kind = d.get("type")
    try:
        if kind == "header":
            h = Header.from_dict(d)
            if not isinstance(h.schema, int) or h.schema > SCHEMA_VERSION:
                raise RecordingError(f"{where}: schema {h.schema} is newer than this pctop "
                                     f"reads ({SCHEMA_VERSION})")
            return h
        if kind == "sample":
            return Sample.from_dict(d)
    except (TypeError, ValueError, AttributeError) as e:
        if isinstance(e, RecordingError):
            raise
        raise RecordingError(f"{where}: not a valid {kind} record: {_plain(e)}") from None
    return None


_MISSING = re.compile(r"(\w+)\.__init__\(\) missing \d+ required (?:positional|keyword-only) "
                      r"arguments?: (.*)")
_UNEXPECTED = re.compile(r"(\w+)\.__init__\(\) got an unexpected keyword argument (.*)")


def _plain(e: Exception) -> str:
    """A record's construction error in the recording's words, not Python's."""
    text = str(e)
    m = _MISSING.match(text)
    if m:
        return f"{_noun(m.group(1))} lacks the field(s) {m.group(2).replace(chr(39), '')}"
    m = _UNEXPECTED.match(text)
    if m:
        return f"{_noun(m.group(1))} has an unknown field {m.group(2).replace(chr(39), '')}"
    return text


def _noun(cls_name: str) -> str:
    """VcpuSample -> 'a vcpu entry'; Header -> 'the header'."""
    return {"Header": "the header", "Sample": "the sample"}.get(
        cls_name, f"a {cls_name.removesuffix('Sample').lower() or cls_name.lower()} entry")


class Recording:
    """Header + Samples of one NDJSON file, loaded as far as it is valid."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        try:
            self._fh = open(self.path, "rb")
        except OSError as e:
            raise RecordingError(f"cannot open recording {self.path}: {e.strerror}") from None
        self.header: Header | None = None
        self.samples: list[Sample] = []
        self.error: RecordingError | None = None
        self._lineno = 0
        self._partial = b""

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> Sample:
        return self.samples[i]

    def records(self, final: bool = True) -> Iterator[Header | Sample]:
        """Yield each new record as it is parsed (appending it to this Recording).

        With final=False a last line without its newline is left for the
        next call (the writer may be mid-line); with final=True it is parsed
        and, if cut off, reported as the truncated line. Raises RecordingError
        at the first bad line; what was yielded before stays loaded.
        """
        if self.error is not None:
            raise self.error
        while True:
            raw = self._fh.readline()
            if not raw:
                break
            if not raw.endswith(b"\n") and not final:
                self._partial += raw
                break
            raw, self._partial = self._partial + raw, b""
            self._lineno += 1
            where = f"{self.path}: line {self._lineno}"
            try:
                rec = parse_record(raw.decode("utf-8", errors="strict"), where)
                if rec is not None:
                    self._accept(rec, where)
            except UnicodeDecodeError:
                self.error = RecordingError(f"{where}: not UTF-8 text (a binary file?); "
                                            "not a pctop recording")
            except RecordingError as e:
                self.error = e
            if self.error is not None:
                # Only a line that began like a record and stops short is a cut-off recording.
                if not raw.endswith(b"\n") and raw.startswith(b'{"') and "JSON" in str(self.error):
                    self.error = RecordingError(f"{self.error} (the line is truncated: the "
                                                "recording was cut off)")
                raise self.error
            if rec is not None:
                yield rec
        if final and self.header is None:
            what = "empty file" if self._lineno == 0 else "no header line"
            self.error = RecordingError(f"{self.path}: {what}; not a pctop recording")
            raise self.error

    def _accept(self, rec: Header | Sample, where: str) -> None:
        if isinstance(rec, Header):
            if self.header is not None:
                raise RecordingError(f"{where}: a second header (recordings were concatenated?)")
            self.header = rec
        else:
            if self.header is None:
                raise RecordingError(f"{where}: a sample before the header line; not a pctop recording")
            self.samples.append(rec)

    def load_more(self, final: bool = False) -> int:
        """Parse what was appended since the last call; returns how many Samples
        were added. Raises RecordingError at a bad line (earlier ones stay)."""
        before = len(self.samples)
        for _ in self.records(final=final):
            pass
        return len(self.samples) - before

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> "Recording":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load_recording(path: str | Path) -> Recording:
    """Load a whole file; raises RecordingError (partial content is lost to the
    caller: use Recording.records() to keep what came before a bad line)."""
    with Recording(path) as rec:
        rec.load_more(final=True)
        if rec.header is None:
            raise RecordingError(f"{rec.path}: no header line; not a pctop recording")
        return rec
