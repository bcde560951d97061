"""Read the items of a run from a file, lazily: CSV, JSON Lines or a JSON array (``-``: stdin).

    with open_input("people.csv") as items:      # the file is opened now, read as items are taken
        bulkpool.run(create_person, items)

- CSV: one dict per row, keyed by the header row; values are strings. ``delimiter``
  (default ``,``) names another separator; a header read as one column that holds ``;``,
  ``|`` or a tab is refused with the delimiter to pass (no guessing: ``csv.Sniffer`` guesses
  wrong on short samples and on text columns). ``field_size_limit`` raises csv's limit of
  131,072 characters a field (for this reader only: csv's global limit is put back).
- JSON Lines (``.jsonl``, ``.ndjson``): one JSON value per line; blank lines are skipped.
  A *rejects file* written by a run (``rejects=...``: objects with the keys ``index``,
  ``item``, ``exc_type``, ``message``, and ``unsafe`` / ``run_id`` where they apply) gives
  back the original items, so the failures of one run can be fed to the next. Items marked
  ``unsafe`` (a COMMIT whose outcome is unknown: they may have been written) are left out
  and counted in ``unsafe_skipped``, unless ``include_unsafe=True``.
- JSON (``.json``): a top-level array, parsed one element at a time, so an array larger
  than memory can be read.

Lines end at LF, CRLF or a bare CR (Python's universal newlines), in every format.

The format comes from ``format`` or else the file's extension. Every problem -- a missing
file, an unparsable line, a CSV row with too many fields -- raises ``InputError`` naming
the file and the line, and saying how to fix it. Since reading is lazy, a bad line in the
middle of a file is met mid-run: the run stops there (``bulkpool.InputFailed``), after
running the items before it.

With ``on_bad_line="skip"`` a line that cannot be read becomes an ``Unreadable`` item (it
fails with its line number, without running) and reading goes on; no row is ever lost
without being counted. In CSV, where one broken quote can swallow the lines after it:

- a quote that is never closed (the file ends inside it): only the line that opens it is
  skipped, and the lines after it are read again as rows. With csv's strict quoting, a
  quoted field that reaches the end of the file holds no closing quote at all, so those
  lines cannot have been meant as its text: reading them as rows is no guess.
- a quoted field that spans lines and then breaks (text after its closing quote): the lines
  of that record are skipped together, as one unreadable item named by their range
  ("lines 4-6"), and reading goes on after them. Reading them again as rows would guess,
  and could write the inside of a field as rows.
- a field longer than ``field_size_limit``: the run stops there, skipping or not. A long
  quoted field and a quote never closed look alike at that point, and rows after it would
  be a guess; the error names ``field_size_limit`` (``--field-size-limit``).
"""

from __future__ import annotations

import bisect
import codecs
import csv
import io
import json
import os
import re
import stat
import sys
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from bulkpool.errors import InputError
from bulkpool.protocol import UNREADABLE, ErrorInfo, Unreadable

FORMATS = ("csv", "jsonl", "json")
EXTENSIONS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json"}
STDIN = "-"
REJECT_KEYS = frozenset({"index", "item", "exc_type", "message"})
REJECT_ALLOWED_KEYS = REJECT_KEYS | {"unsafe", "unreadable", "run_id", "line"}  # written when they apply
KEPT_LINE_SHIFTS = 20_000  # memory for line_of(): a few MB however long the file
READ_SIZE = 1 << 16  # characters per read of a JSON array, bytes per read of lines
SKIP_HINT = 'or skip such lines: on_bad_line="skip" (--on-bad-line skip)'
SEPARATORS = {";": "semicolon", "|": "pipe", "\t": "tab"}  # looked for in a one-column header


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


def open_input(
    path: str | os.PathLike[str],
    format: str | None = None,
    *,
    include_unsafe: bool = False,
    on_bad_line: str = "stop",
    delimiter: str | None = None,
    field_size_limit: int | None = None,
) -> Input:
    """Open ``path`` (``"-"``: stdin) now, so a missing file fails before any work; read it lazily.

    ``on_bad_line``: ``"stop"`` (raise at a line that cannot be read) or ``"skip"`` (give it
    as a failing ``Unreadable`` item and go on). CSV only: ``delimiter`` (default ``,``) and
    ``field_size_limit`` (characters a field may hold; default csv's 131,072).
    """
    return Input(
        path,
        format,
        include_unsafe=include_unsafe,
        on_bad_line=on_bad_line,
        delimiter=delimiter,
        field_size_limit=field_size_limit,
    )


class Input:
    """The items of one input file: iterate once; a context manager that closes the file.

    ``items_read`` and ``line`` say how far reading got (for messages); ``size`` (None for
    a pipe) and ``position`` are in bytes, for a progress bar with a total; ``line_of(index)``
    is the line an item started on (CSV, JSON Lines). With ``on_bad_line="skip"`` a line that
    cannot be read (CSV, JSON Lines) comes as an ``Unreadable`` item, which fails without
    running, and reading goes on.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        format: str | None = None,
        *,
        include_unsafe: bool = False,
        on_bad_line: str = "stop",
        delimiter: str | None = None,
        field_size_limit: int | None = None,
    ) -> None:
        self.path = os.fspath(path)
        if format is not None and format not in FORMATS:
            raise InputError(f"format={format!r}: use one of {', '.join(FORMATS)}.", path=self.path)
        if on_bad_line not in ("stop", "skip"):
            raise InputError(f"on_bad_line={on_bad_line!r}: use 'stop' or 'skip'.", path=self.path)
        if delimiter is not None and (
            not isinstance(delimiter, str) or len(delimiter) != 1 or delimiter in '"\r\n'
        ):
            raise InputError(
                f"delimiter={delimiter!r}: give one character, not a quote or a line break "
                "(e.g. ';', '|' or '\\t').",
                path=self.path,
            )
        if field_size_limit is not None and not _is_whole(field_size_limit):
            raise InputError(
                f"field_size_limit={field_size_limit!r}: give a whole number of characters, 1 or more.",
                path=self.path,
            )
        self.delimiter = delimiter
        self.field_size_limit = field_size_limit
        self.format = format or guess_format(self.path)
        if self.format != "csv" and (delimiter is not None or field_size_limit is not None):
            given = "delimiter" if delimiter is not None else "field_size_limit"
            raise InputError(
                f"{self.path}: {given}= applies to CSV files only, and this one is read as {self.format}.",
                path=self.path,
            )
        self.items_read = 0
        self.include_unsafe = include_unsafe
        self.unsafe_skipped = 0
        self.unreadable_skipped = 0
        self.skip_bad_lines = on_bad_line == "skip"
        self.line = 0
        self._file = _open(self.path)
        self.size = _size_of(self._file)
        self.position = 0
        self._line_shifts: list[tuple[int, int]] = []  # (index, line - index) where it changes
        self._started = False

    def __iter__(self) -> Iterator[Any]:
        if self._started:
            raise InputError(f"{self.path}: an input can be read only once.", path=self.path)
        self._started = True
        return self._items()

    def line_of(self, index: int) -> int | None:
        """The line item ``index`` started on (None for a JSON array, or an item not read yet)."""
        if self.format == "json" or index >= self.items_read:
            return None
        at = bisect.bisect_right(self._line_shifts, (index, 1 << 62)) - 1
        return index + self._line_shifts[at][1] if at >= 0 else None

    def _items(self) -> Iterator[Any]:
        readers = {"csv": self._csv, "jsonl": self._jsonl, "json": self._json}
        try:
            for line, item in readers[self.format]():
                if line:  # 0: a JSON array, whose elements have no line worth tracking
                    self._note_line(line)
                self.items_read += 1
                yield item
        finally:
            self.close()

    def _note_line(self, line: int) -> None:
        """Where lines and items drift apart (a header, blank lines, multi-line fields). Only
        recent shifts are kept: failures are asked for while their chunk is in flight."""
        shift = line - self.items_read
        if not self._line_shifts or self._line_shifts[-1][1] != shift:
            self._line_shifts.append((self.items_read, shift))
            if len(self._line_shifts) > KEPT_LINE_SHIFTS:
                del self._line_shifts[: KEPT_LINE_SHIFTS // 2]

    def error(self, line: int, problem: str, fix: str, last: int | None = None) -> InputError:
        where = f"lines {line}-{last}" if last is not None and last > line else f"line {line}"
        return InputError(f"{self.path}: {where}: {problem}. Fix: {fix}.", path=self.path, line=line)

    def _bad(self, line: int, text: str, problem: str, fix: str, last: int | None = None) -> Unreadable:
        """A line (or the lines ``line`` to ``last`` of one CSV record) that cannot be read:
        raised, naming how to skip it, or with ``on_bad_line="skip"`` given as an item."""
        if not self.skip_bad_lines:
            raise self.error(line, problem, f"{fix}; {SKIP_HINT}", last)
        error = self.error(line, problem, fix, last)
        return Unreadable(line, text.rstrip("\r\n"), ErrorInfo(UNREADABLE, str(error), ""))

    def close(self) -> None:
        if self.path != STDIN:
            self._file.close()

    def __enter__(self) -> Input:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Input({self.path!r}, format={self.format!r})"

    def _lines(self) -> Iterator[tuple[int, str, Unreadable | None]]:
        """(number, text, problem) per line, each decoded alone, so a byte that is not UTF-8
        is reported on its own line. ``problem``: that line could not be decoded (skip mode;
        ``text`` is then decoded with replacement characters)."""
        for number, raw in enumerate(_raw_lines(self._file), 1):
            self.line = number
            self.position += len(raw)
            if number == 1:
                raw = raw.removeprefix(codecs.BOM_UTF8)  # as Excel writes: not part of the first name
            try:
                yield number, raw.decode("utf-8"), None
            except UnicodeDecodeError as error:
                text = raw.decode("utf-8", "replace")
                problem = f"not UTF-8 text ({error.reason} at byte {error.start + 1} of the line)"
                yield number, text, self._bad(number, text, problem, "save the file as UTF-8")

    # -- the formats ---------------------------------------------------------------------

    def _csv(self) -> Iterator[tuple[int, Any]]:
        return iter(_CsvRows(self))

    def _jsonl(self) -> Iterator[tuple[int, Any]]:
        rejects: bool | None = None  # decided by the first value
        for number, text, problem in self._lines():
            if problem is not None:
                yield number, problem
                continue
            if not text.strip():
                continue
            try:
                value = json.loads(text)
            except json.JSONDecodeError as error:
                why = f"not valid JSON ({error.msg}, column {error.colno})"
                yield number, self._bad(number, text, why, "each line must hold one complete JSON value")
                continue
            is_reject = isinstance(value, dict) and REJECT_KEYS <= value.keys() <= REJECT_ALLOWED_KEYS
            if rejects is None:
                rejects = is_reject
            elif rejects and not is_reject:
                raise self.error(
                    number,
                    "not a rejects record (keys index, item, exc_type, message), though the first line is",
                    "feed back a rejects file as written, or keep only your own items",
                )
            if rejects and value.get("unsafe") and not self.include_unsafe:
                self.unsafe_skipped += 1  # it may have been written: feeding it again could write it twice
                continue
            if rejects and value.get("unreadable"):
                self.unreadable_skipped += 1  # a line the input could not read: no item to feed
                continue
            yield number, value["item"] if rejects else value

    def _json(self) -> Iterator[tuple[int, Any]]:
        # Elements have no line of their own worth tracking; 0 keeps line_of() silent.
        return ((0, value) for value in _JsonArray(_Decoded(self._file, self), self).values())


class _CsvRows:
    """The rows of a CSV input as (line, item): dicts keyed by the header row; a record that
    cannot be read raised, or skipped as the module docstring says."""

    def __init__(self, source: Input) -> None:
        self.source = source

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        lines = _RecordLines(self.source._lines())
        reader = csv.reader(lines, strict=True, delimiter=self.source.delimiter or ",")
        header = self._header(reader)
        while True:
            lines.record.clear()
            try:
                with self._field_limit():
                    row = next(reader, None)
            except csv.Error as error:
                yield lines.record[0][0], self._broken_record(str(error), lines)
                continue
            if row is None:
                return
            if not row:
                continue  # a blank line
            start, last = lines.record[0][0], lines.record[-1][0]
            broken = [lines.undecodable.pop(n) for n in range(start, last + 1) if n in lines.undecodable]
            if broken:
                yield start, broken[0]
            elif len(row) != len(header):
                yield (
                    start,
                    self.source._bad(
                        start,
                        (self.source.delimiter or ",").join(row),
                        f"{len(row)} fields, but the header row has {len(header)}",
                        "quote fields that contain the delimiter, and give every row the header's columns",
                    ),
                )
            else:
                yield start, dict(zip(header, row, strict=True))

    def _broken_record(self, problem: str, lines: _RecordLines) -> Unreadable:
        """The record in ``lines.record`` broke csv's rules: raised, or skipped as the module
        docstring says (only a quote never closed has its lines read again)."""
        (start, first), (last, _) = lines.record[0], lines.record[-1]
        if problem.startswith("field larger than field limit"):
            limit = self.source.field_size_limit or csv.field_size_limit()
            raise self.source.error(
                start,
                f"a field longer than {limit:,} characters (csv's limit), read to line {last}",
                f"raise the limit with field_size_limit= (--field-size-limit N); or, if a quote "
                f"opened on line {start} is never closed, close it",
            )
        if problem == "unexpected end of data":
            lines.undecodable.pop(start, None)
            lines.read_again(lines.record[1:])  # their own problems, if any, are met again
            goes_on = "; the lines after it are read again as rows" if self.source.skip_bad_lines else ""
            return self.source._bad(
                start,
                first,
                f"a quote opened on line {start} is never closed (the file ends inside it, at line "
                f"{last}){goes_on}",
                'close the quote, or double each quote inside a quoted field ("")',
            )
        for number, _ in lines.record:
            lines.undecodable.pop(number, None)
        text = "".join(text for _, text in lines.record)
        return self.source._bad(start, text, f"not valid CSV ({problem})", "check the quoting", last)

    @contextmanager
    def _field_limit(self) -> Iterator[None]:
        """csv's field size limit is global to the process: raised for this reader's reads only."""
        if self.source.field_size_limit is None:
            yield
            return
        saved = csv.field_size_limit(self.source.field_size_limit)
        try:
            yield
        finally:
            csv.field_size_limit(saved)

    def _header(self, reader: Any) -> list[str]:
        try:
            with self._field_limit():
                header = next(reader, None)
        except csv.Error as error:
            raise self.source.error(1, f"not valid CSV ({error})", "check the quoting") from None
        if header is None:
            raise self.source.error(1, "the file is empty, with no header row", "put the column names first")
        blank = [number for number, name in enumerate(header, 1) if not name.strip()]
        if blank:
            raise self.source.error(
                1, f"column {blank[0]} of the header row has no name", "name every column in line 1"
            )
        repeated = sorted({name for name in header if header.count(name) > 1})
        if repeated:
            raise self.source.error(
                1, f"the header names {repeated[0]!r} twice", "give each column its own name"
            )
        if len(header) == 1 and self.source.delimiter is None:
            self._check_one_column(header[0])
        return list(header)

    def _check_one_column(self, name: str) -> None:
        """A header read as one column that holds another usual separator: the wrong delimiter,
        which would give every row as one field (and a KeyError per item in ``func``)."""
        for separator, word in SEPARATORS.items():
            if separator in name:
                flag = "tab" if separator == "\t" else f"'{separator}'"
                raise self.source.error(
                    1,
                    f"the header row is one column, {name!r}, which holds a {word}: this looks like "
                    f"a {word}-delimited file",
                    f"pass delimiter={separator!r} (--delimiter {flag}); or delimiter=',' if the "
                    "file really has one column",
                )


class _RecordLines:
    """The text lines of a CSV file as ``csv.reader`` takes them, keeping the lines of the
    record being read (``record``: number, text), so that the lines a quote never closed
    swallowed can be given again (``read_again``). ``undecodable``: lines that were not
    UTF-8, by number, until their record is read."""

    def __init__(self, lines: Iterator[tuple[int, str, Unreadable | None]]) -> None:
        self._lines = lines
        self._again: deque[tuple[int, str]] = deque()
        self.record: list[tuple[int, str]] = []
        self.undecodable: dict[int, Unreadable] = {}

    def __iter__(self) -> _RecordLines:
        return self

    def __next__(self) -> str:
        if self._again:
            number, text = self._again.popleft()
        else:
            number, text, problem = next(self._lines)
            if problem is not None:
                self.undecodable[number] = problem
        self.record.append((number, text))
        return text

    def read_again(self, lines: list[tuple[int, str]]) -> None:
        self._again.extendleft(reversed(lines))


def _is_whole(value: object) -> bool:
    """A whole number, 1 or more (not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _raw_lines(file: IO[bytes]) -> Iterator[bytes]:
    """The lines of a binary file, each with its ending: LF, CRLF or a bare CR (universal
    newlines; ``for line in file`` would split at LF only)."""
    read = getattr(file, "read1", file.read)  # what is there: a pipe's lines come as they are written
    rest = b""
    while block := read(READ_SIZE):
        lines = (rest + block).splitlines(keepends=True)
        # The last line may go on in the next block, and a CR at its end may be a CRLF's half.
        rest = lines.pop() if not lines[-1].endswith(b"\n") else b""
        yield from lines
    if rest:
        yield rest


class _Decoded:
    """The bytes of a file as text, ``read(n)`` at a time; a byte that is not UTF-8 is
    reported on its line, counted from the newlines decoded before it."""

    def __init__(self, file: IO[bytes], source: Input) -> None:
        self.file = file
        self.source = source
        self.decoder = codecs.getincrementaldecoder("utf-8-sig")()
        self.newlines = 0

    def read(self, size: int) -> str:
        """Up to about ``size`` characters; "" only at the end of the file."""
        while True:
            raw = self.file.read(size)
            self.source.position += len(raw)
            try:
                text = self.decoder.decode(raw, final=not raw)
            except UnicodeDecodeError as error:
                line = self.newlines + raw[: error.start].count(b"\n") + 1
                problem = f"not UTF-8 text ({error.reason})"
                raise self.source.error(line, problem, "save the file as UTF-8") from None
            self.newlines += text.count("\n")
            if text or not raw:  # an empty text with bytes read: a character cut by the read
                return text


def _open(path: str) -> IO[bytes]:
    if path == STDIN:
        buffer = getattr(sys.stdin, "buffer", None)
        if buffer is None:  # stdin replaced by a text stream (as in tests)
            return io.BytesIO(sys.stdin.read().encode())
        return buffer
    try:
        return open(path, "rb")
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


def _size_of(file: IO[bytes]) -> int | None:
    """The file's size in bytes, for a progress bar; None for a pipe or a terminal."""
    try:
        status = os.fstat(file.fileno())
    except (OSError, ValueError, io.UnsupportedOperation):
        return None
    return status.st_size if stat.S_ISREG(status.st_mode) else None


_NUMBER_TAIL = re.compile(r"[0-9eE.+-]*")


class _JsonArray:
    """A top-level JSON array, decoded one element at a time from a buffer a few reads long.

    ``raw_decode`` parses one element at the front of the buffer. An element cut by the end
    of the buffer either fails near that end (read more and try again, with reads that
    double, so a huge element costs O(n log n)) or -- a number -- parses as a shorter one,
    so an element that reaches the buffer's end is only trusted at the end of the file.
    """

    def __init__(self, file: _Decoded, source: Input) -> None:
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
        text = self.file.read(size)
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
