"""Read the items of a run from a file, lazily: CSV, JSON Lines or a JSON array (``-``: stdin).

    with open_input("people.csv") as items:      # the file is opened now, read as items are taken
        bulkpool.run(create_person, items)

- CSV: one dict per row, keyed by the header row; values are strings.
- JSON Lines (``.jsonl``, ``.ndjson``): one JSON value per line; blank lines are skipped.
  A *rejects file* written by a run (``rejects=...``: objects with exactly the keys
  ``index``, ``item``, ``exc_type``, ``message``, and optionally ``run_id``, as the admin's
  "Download failures" writes them) gives back the original items, so the failures of one
  run can be fed to the next.
- JSON (``.json``): a top-level array, parsed one element at a time, so an array larger
  than memory can be read.

The format comes from ``format`` or else the file's extension. Every problem -- a missing
file, an unparsable line, a CSV row with too many fields -- raises ``InputError`` naming
the file and the line, and saying how to fix it. Since reading is lazy, a bad line in the
middle of a file is met mid-run: ``UntilBadInput`` ends the input cleanly there instead.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import sys
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import IO, Any

from bulkpool.errors import InputError

FORMATS = ("csv", "jsonl", "json")
EXTENSIONS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json"}
STDIN = "-"
REJECT_KEYS = frozenset({"index", "item", "exc_type", "message"})
DOWNLOADED_REJECT_KEYS = REJECT_KEYS | {"run_id"}  # the admin's download of journaled failures
READ_SIZE = 1 << 16  # characters per read of a JSON array


def guess_format(path: str | os.PathLike[str]) -> str:
    """The format for ``path`` from its extension; ``InputError`` if it says nothing."""
    text = os.fspath(path)
    if text == STDIN:
        raise InputError(
            f"Reading standard input ({STDIN}) needs its format: give one of {', '.join(FORMATS)}.",
            path=text,
        )
    suffix = Path(text).suffix.lower()
    if suffix not in EXTENSIONS:
        known = ", ".join(f"{ext} ({name})" for ext, name in EXTENSIONS.items())
        raise InputError(
            f"{text}: cannot tell the format from the extension {suffix or '(none)'!r}; "
            f"give the format ({', '.join(FORMATS)}) or use one of: {known}.",
            path=text,
        )
    return EXTENSIONS[suffix]


def open_input(path: str | os.PathLike[str], format: str | None = None) -> Input:
    """Open ``path`` (``"-"``: stdin) now, so a missing file fails before any work; read it lazily."""
    return Input(path, format)


class Input:
    """The items of one input file: iterate once; a context manager that closes the file.

    ``items_read`` and ``line`` say how far reading got (for messages).
    """

    def __init__(self, path: str | os.PathLike[str], format: str | None = None) -> None:
        self.path = os.fspath(path)
        if format is not None and format not in FORMATS:
            raise InputError(f"format={format!r}: use one of {', '.join(FORMATS)}.", path=self.path)
        self.format = format or guess_format(self.path)
        self.items_read = 0
        self.line = 0
        self._file = _open(self.path)
        self._started = False

    def __iter__(self) -> Iterator[Any]:
        if self._started:
            raise InputError(f"{self.path}: an input can be read only once.", path=self.path)
        self._started = True
        return self._items()

    def _items(self) -> Iterator[Any]:
        readers = {"csv": self._csv, "jsonl": self._jsonl, "json": self._json}
        try:
            for item in readers[self.format]():
                self.items_read += 1
                yield item
        except UnicodeDecodeError as error:
            raise self.error(
                self.line + 1, f"not UTF-8 text ({error.reason})", "save the file as UTF-8"
            ) from None
        finally:
            self.close()

    def error(self, line: int, problem: str, fix: str) -> InputError:
        return InputError(f"{self.path}: line {line}: {problem}. Fix: {fix}.", path=self.path, line=line)

    def close(self) -> None:
        if self.path == STDIN:
            if isinstance(self._file, io.TextIOWrapper) and self._file is not sys.stdin:
                try:
                    self._file.detach()  # leave stdin itself open
                except ValueError:  # already detached
                    pass
        else:
            self._file.close()

    def __enter__(self) -> Input:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Input({self.path!r}, format={self.format!r})"

    # -- the formats ---------------------------------------------------------------------

    def _csv(self) -> Iterator[dict[str, str]]:
        reader = csv.reader(self._file, strict=True)
        try:
            header = next(reader, None)
            self.line = reader.line_num
            if header is None:
                raise self.error(1, "the file is empty, with no header row", "put the column names first")
            blank = [number for number, name in enumerate(header, 1) if not name.strip()]
            if blank:
                raise self.error(
                    1, f"column {blank[0]} of the header row has no name", "name every column in line 1"
                )
            repeated = sorted({name for name in header if header.count(name) > 1})
            if repeated:
                raise self.error(
                    1, f"the header names {repeated[0]!r} twice", "give each column its own name"
                )
            for row in reader:
                start, self.line = self.line + 1, reader.line_num
                if not row:
                    continue  # a blank line
                if len(row) != len(header):
                    raise self.error(
                        start,
                        f"{len(row)} fields, but the header row has {len(header)}",
                        "quote fields that contain commas, and give every row the header's columns",
                    )
                yield dict(zip(header, row, strict=True))
        except csv.Error as error:
            raise self.error(reader.line_num, f"not valid CSV ({error})", "check the quoting") from None

    def _jsonl(self) -> Iterator[Any]:
        rejects: bool | None = None  # decided by the first value
        for number, text in enumerate(self._file, 1):
            self.line = number
            if not text.strip():
                continue
            try:
                value = json.loads(text)
            except json.JSONDecodeError as error:
                raise self.error(
                    self.line,
                    f"not valid JSON ({error.msg}, column {error.colno})",
                    "each line must hold one complete JSON value",
                ) from None
            is_reject = isinstance(value, dict) and value.keys() in (REJECT_KEYS, DOWNLOADED_REJECT_KEYS)
            if rejects is None:
                rejects = is_reject
            elif rejects and not is_reject:
                raise self.error(
                    self.line,
                    "not a rejects record (keys index, item, exc_type, message), though the first line is",
                    "feed back a rejects file as written, or keep only your own items",
                )
            yield value["item"] if rejects else value

    def _json(self) -> Iterator[Any]:
        return _JsonArray(self._file, self).values()


def _open(path: str) -> IO[str]:
    if path == STDIN:
        buffer = getattr(sys.stdin, "buffer", None)
        if buffer is None:  # stdin replaced by a text stream (as in tests)
            return sys.stdin
        # utf-8-sig: a byte order mark (as Excel writes) is not part of the first column's name.
        return io.TextIOWrapper(buffer, encoding="utf-8-sig", newline="")
    try:
        return open(path, encoding="utf-8-sig", newline="")
    except FileNotFoundError:
        raise InputError(
            f"{path}: no such file (looked for {Path(path).resolve()}). Fix: check the path.", path=path
        ) from None
    except IsADirectoryError:
        raise InputError(
            f"{path}: is a folder, not a file. Fix: name the file inside it.", path=path
        ) from None
    except OSError as error:
        raise InputError(f"{path}: cannot be opened ({error.strerror or error}).", path=path) from None


_NUMBER_TAIL = re.compile(r"[0-9eE.+-]*")


class _JsonArray:
    """A top-level JSON array, decoded one element at a time from a buffer a few reads long.

    ``raw_decode`` parses one element at the front of the buffer. An element cut by the end
    of the buffer either fails near that end (read more and try again, with reads that
    double, so a huge element costs O(n log n)) or -- a number -- parses as a shorter one,
    so an element that reaches the buffer's end is only trusted at the end of the file.
    """

    def __init__(self, file: IO[str], source: Input) -> None:
        self.file = file
        self.source = source
        self.decoder = json.JSONDecoder()
        self.buf = ""
        self.pos = 0
        self.eof = False
        self.line = 1  # line and column (1-based) of buf[0]
        self.column = 1

    def values(self) -> Iterator[Any]:
        first = self._peek()
        if first != "[":
            found = f"found {first!r}" if first else "the file is empty"
            raise self._error(self.pos, f"expected a JSON array starting with '[', {found}")
        self.pos += 1
        if self._peek() == "]":
            self.pos += 1
            self._expect_end()
            return
        while True:
            yield self._value()
            after = self._peek()
            if after == ",":
                self.pos += 1
            elif after == "]":
                self.pos += 1
                self._expect_end()
                return
            elif after:
                raise self._error(self.pos, f"expected ',' or ']' after an element, found {after!r}")
            else:
                raise self._error(self.pos, "the file ends inside the array (no closing ']')")

    def _value(self) -> Any:
        self._peek()
        size = READ_SIZE
        while True:
            try:
                value, end = self.decoder.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError as error:
                cut = error.pos >= len(self.buf) - 8 or error.msg.startswith("Unterminated string")
                if cut and not self.eof:
                    self._read(size)  # then decode again: positions change as the buffer does
                    size *= 2
                    continue
                raise self._error(error.pos, error.msg.removesuffix(" starting at")) from None
            if _NUMBER_TAIL.fullmatch(self.buf, end) and not self.eof:
                self._read(size)  # the element reached the end of the buffer: it may go on
                size *= 2
                continue
            self.pos = end
            return value

    def _peek(self) -> str:
        """Skip whitespace; the next character, or "" at the end of the file."""
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos] in " \t\r\n":
                self.pos += 1
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self._read(READ_SIZE):
                return ""

    def _read(self, size: int) -> bool:
        """Append up to ``size`` characters, first dropping what is consumed; False at the end."""
        if self.eof:
            return False
        self.line, self.column = self._where(self.pos)
        self.buf, self.pos = self.buf[self.pos :], 0
        try:
            text = self.file.read(size)
        except UnicodeDecodeError as error:
            line, _ = self._where(len(self.buf))
            raise self.source.error(
                line, f"not UTF-8 text ({error.reason})", "save the file as UTF-8"
            ) from None
        if not text:
            self.eof = True
            return False
        self.buf += text
        return True

    def _expect_end(self) -> None:
        extra = self._peek()
        if extra:
            raise self._error(self.pos, f"unexpected {extra!r} after the array's closing ']'")

    def _where(self, pos: int) -> tuple[int, int]:
        before = self.buf[:pos]
        newlines = before.count("\n")
        if newlines:
            return self.line + newlines, pos - before.rfind("\n")
        return self.line, self.column + pos

    def _error(self, pos: int, problem: str) -> InputError:
        line, column = self._where(pos)
        self.source.line = line
        return self.source.error(
            line,
            f"column {column}: {problem}",
            "the file must hold one JSON array of items: [item, item, ...]",
        )


class UntilBadInput:
    """The items of ``items`` a chunk at a time, ending cleanly before a chunk the input breaks in.

    A reader's ``InputError`` raised inside a run would leave the chunks in flight to
    commit uncounted. Ending the input instead lets the run finish and count everything
    it was given; the error is kept in ``error``. Whole chunks only (``chunk_size`` as the
    run's): a journaled run then resumes on the same chunk boundaries once the input is fixed.
    """

    def __init__(self, items: Iterable[Any], chunk_size: int) -> None:
        self.items = items
        self.chunk_size = chunk_size
        self.error: InputError | None = None

    def __iter__(self) -> Iterator[Any]:
        iterator = iter(self.items)
        while True:
            try:
                chunk = list(islice(iterator, self.chunk_size))
            except InputError as error:
                self.error = error
                return
            if not chunk:
                return
            yield from chunk
