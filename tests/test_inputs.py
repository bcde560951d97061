"""bulkpool.inputs: lazy CSV, JSON Lines and JSON array readers, and their error messages."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest

from bulkpool import inputs
from bulkpool.chunking import chunked
from bulkpool.errors import BulkpoolError, InputError
from bulkpool.inputs import guess_format, open_input


def read(path: Path, format: str | None = None) -> list[object]:
    with open_input(path, format) as source:
        return list(source)


def write(tmp_path: Path, name: str, text: str | bytes) -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def error_of(path: Path, format: str | None = None) -> InputError:
    with pytest.raises(InputError) as caught:
        read(path, format)
    return caught.value


# -- choosing the format -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "format"),
    [("a.csv", "csv"), ("a.CSV", "csv"), ("a.jsonl", "jsonl"), ("a.ndjson", "jsonl"), ("a.json", "json")],
)
def test_format_comes_from_the_extension(name, format):
    """.csv, .jsonl/.ndjson and .json name their format, whatever the case."""
    assert guess_format(name) == format


def test_unknown_extension_asks_for_the_format():
    """A file whose extension says nothing is refused with the formats and extensions known."""
    with pytest.raises(InputError, match=r"data\.txt.*'\.txt'.*csv, jsonl, json"):
        guess_format("data.txt")


def test_stdin_needs_a_format():
    """'-' (stdin) has no extension: the format must be given."""
    with pytest.raises(InputError, match=r"standard input.*needs its format"):
        open_input("-")


def test_given_format_wins_over_the_extension(tmp_path):
    """An explicit format reads a file whatever its name."""
    path = write(tmp_path, "rows.txt", '{"a": 1}\n')
    assert read(path, "jsonl") == [{"a": 1}]


def test_input_error_is_a_bulkpool_error():
    """InputError is part of the BulkpoolError tree."""
    assert issubclass(InputError, BulkpoolError)


# -- opening -------------------------------------------------------------------------------


def test_missing_file_is_named_when_opened(tmp_path):
    """A missing file fails at once (before any work), naming the path it looked for."""
    missing = tmp_path / "nope.csv"
    with pytest.raises(InputError, match=r"nope\.csv: no such file .*Fix: check the path") as caught:
        open_input(missing)
    assert caught.value.path == str(missing)


def test_folder_is_refused(tmp_path):
    """A folder given as the input says so."""
    folder = tmp_path / "rows.csv"
    folder.mkdir()
    with pytest.raises(InputError, match="is a folder"):
        open_input(folder)


def test_unknown_format_name_is_refused(tmp_path):
    """A format that is not csv, jsonl or json is refused."""
    with pytest.raises(InputError, match="format='xml'"):
        open_input(write(tmp_path, "a.csv", "a\n"), "xml")


def test_an_input_is_read_once(tmp_path):
    """Iterating an input a second time is refused rather than silently empty."""
    with open_input(write(tmp_path, "a.jsonl", "1\n")) as source:
        assert list(source) == [1]
        with pytest.raises(InputError, match="only once"):
            iter(source)


# -- CSV -------------------------------------------------------------------------------------


def test_csv_rows_are_dicts_keyed_by_the_header(tmp_path):
    """Each row is a dict of strings keyed by the header; quoted commas and newlines stay in a field."""
    path = write(tmp_path, "a.csv", 'name,note\nada,"hello, world"\nbob,"two\nlines"\n\ncy,\n')
    assert read(path) == [
        {"name": "ada", "note": "hello, world"},
        {"name": "bob", "note": "two\nlines"},
        {"name": "cy", "note": ""},
    ]


def test_csv_byte_order_mark_is_not_part_of_the_first_column(tmp_path):
    """A UTF-8 byte order mark (as Excel writes) does not end up in the first column's name."""
    path = write(tmp_path, "a.csv", "\ufeffname\nada\n".encode())
    assert read(path) == [{"name": "ada"}]


def test_empty_csv_has_no_header(tmp_path):
    """An empty CSV file is refused: it has no header row."""
    error = error_of(write(tmp_path, "a.csv", ""))
    assert "line 1: the file is empty, with no header row" in str(error)
    assert error.line == 1


@pytest.mark.parametrize(
    ("header", "problem"),
    [("name,,note", "column 2 of the header row has no name"), ("a,b,a", "the header names 'a' twice")],
)
def test_bad_csv_header_is_refused(tmp_path, header, problem):
    """A header with an unnamed or repeated column is refused at line 1."""
    assert problem in str(error_of(write(tmp_path, "a.csv", f"{header}\n1,2,3\n")))


def test_csv_row_with_wrong_field_count_names_its_line(tmp_path):
    """A row with more or fewer fields than the header is refused, naming the file and its line."""
    path = write(tmp_path, "a.csv", 'name,age\nada,36\n"bob\nsmith",40\ncy,1,extra\n')
    error = error_of(path)
    assert str(error).startswith(f"{path}: line 5: 3 fields, but the header row has 2. Fix:")
    assert error.line == 5


def test_malformed_csv_quoting_names_its_line(tmp_path):
    """Text after a closing quote is an error, not a silently mangled field."""
    error = error_of(write(tmp_path, "a.csv", 'a,b\n1,2\n"x"y,3\n'))
    assert "line 3: not valid CSV" in str(error)


# -- JSON Lines ------------------------------------------------------------------------------


def test_jsonl_gives_one_value_per_line(tmp_path):
    """Each non-blank line is one JSON value of any kind."""
    path = write(tmp_path, "a.jsonl", '{"a": 1}\n\n[1, 2]\n"text"\n7\r\nnull\n')
    assert read(path) == [{"a": 1}, [1, 2], "text", 7, None]


def test_jsonl_bad_line_names_file_line_and_column(tmp_path):
    """An unparsable line is named with its file, line and column, and says how to fix it."""
    path = write(tmp_path, "a.jsonl", '{"a": 1}\n\n{"a": 2,}\n{"a": 3}\n')
    with open_input(path) as source:
        items = iter(source)
        assert next(items) == {"a": 1}  # lazily: the bad line is met only when reached
        with pytest.raises(InputError) as caught:
            next(items)
    message = str(caught.value)
    assert message.startswith(f"{path}: line 3: not valid JSON (")
    column = _json_error_column('{"a": 2,}')  # 9 before Python 3.13, 8 since
    assert f"column {column}" in message and "Fix: each line must hold one complete JSON value" in message
    assert caught.value.line == 3


def test_rejects_file_gives_back_the_original_items(tmp_path):
    """A rejects file (index, item, exc_type, message per line) reads as the failed items."""
    lines = [
        {"index": 3, "item": {"key": "c"}, "exc_type": "ValueError", "message": "bad"},
        {"index": 9, "item": [1, 2], "exc_type": "KeyError", "message": "'x'"},
    ]
    path = write(tmp_path, "rejects.jsonl", "".join(json.dumps(line) + "\n" for line in lines))
    assert read(path) == [{"key": "c"}, [1, 2]]


def test_objects_with_other_keys_are_not_unwrapped(tmp_path):
    """Only objects with exactly the rejects keys are unwrapped; other objects are items."""
    line = {"index": 1, "item": 2, "exc_type": "E", "message": "m", "extra": True}
    path = write(tmp_path, "a.jsonl", json.dumps(line) + "\n")
    assert read(path) == [line]


def test_rejects_file_with_a_foreign_line_is_refused(tmp_path):
    """A line that is not a rejects record, in a file that starts as one, is an error."""
    first = {"index": 0, "item": 1, "exc_type": "E", "message": "m"}
    path = write(tmp_path, "rejects.jsonl", json.dumps(first) + '\n{"key": "x"}\n')
    assert "line 2: not a rejects record" in str(error_of(path))


def test_stdin_is_read(monkeypatch):
    """'-' reads standard input, in the format given, and leaves stdin open."""
    stdin = io.TextIOWrapper(io.BytesIO(b'{"a": 1}\n{"a": 2}\n'))
    monkeypatch.setattr(sys, "stdin", stdin)
    with open_input("-", "jsonl") as source:
        assert list(source) == [{"a": 1}, {"a": 2}]
    assert not stdin.buffer.closed


def test_text_that_is_not_utf8_names_its_line(tmp_path):
    """Bytes that are not UTF-8 are reported with the line, and the fix."""
    path = write(tmp_path, "a.jsonl", b'"ok"\n"caf\xe9"\n')
    assert "not UTF-8 text" in str(error_of(path))


# -- JSON arrays -----------------------------------------------------------------------------

SAMPLE = """[
  {"name": "ada", "tags": ["x", "y"], "nested": {"a": [1, 2, {"b": null}]}},
  12345, -12.5e-3, 1E+5, 0, true, false, null,
  "a string with \\"quotes\\", a \\\\ backslash, \\u00e9 and \\n",
  [], {}, [[[]]], "caf\u00e9 \u2603"
]
"""


def test_json_array_gives_its_elements(tmp_path):
    """Each element of the top-level array is an item, of any JSON type."""
    assert read(write(tmp_path, "a.json", SAMPLE)) == json.loads(SAMPLE)


@pytest.mark.parametrize("read_size", [1, 2, 3, 5, 7, 16])
def test_json_array_elements_cut_by_any_read_boundary(tmp_path, monkeypatch, read_size):
    """Elements split across reads at every position (numbers too: '1E+5' read as '1E') parse whole."""
    monkeypatch.setattr(inputs, "READ_SIZE", read_size)
    assert read(write(tmp_path, "a.json", SAMPLE)) == json.loads(SAMPLE)


def test_json_array_is_read_lazily(tmp_path):
    """Taking the first element of a large array reads only the start of the file."""
    path = tmp_path / "big.json"
    with path.open("w") as file:
        file.write("[" + ",".join(json.dumps({"n": i, "pad": "x" * 40}) for i in range(100_000)) + "]")
    size = path.stat().st_size
    with open_input(path) as source:
        items = iter(source)
        assert next(items) == {"n": 0, "pad": "x" * 40}
        assert source.position < size // 10


@pytest.mark.parametrize(
    ("text", "line", "problem"),
    [
        ("", 1, "expected a JSON array starting with '[', the file is empty"),
        ('{"a": 1}', 1, "expected a JSON array starting with '[', found '{'"),
        ('[1,\n 2,\n {"a" 3}]', 3, "column 7: Expecting ':' delimiter"),
        ("[1, 2,]", 1, "column 7: Expecting value"),
        ("[1, 2 3]", 1, "column 7: expected ',' or ']' after an element, found '3'"),
        ("[1, 2", 1, "the file ends inside the array (no closing ']')"),
        ('[1, "abc', 1, "column 5: Unterminated string"),
        ("[1]\n[2]", 2, "column 1: unexpected '[' after the array's closing ']'"),
    ],
)
def test_bad_json_array_names_line_and_column(tmp_path, text, line, problem):
    """A broken array is reported with the file, line and column, and the expected shape."""
    path = write(tmp_path, "a.json", text)
    error = error_of(path)
    assert str(error).startswith(f"{path}: line {line}: ")
    assert problem in str(error)
    assert "Fix: the file must hold one JSON array of items" in str(error)
    assert error.line == line


def test_bad_element_is_met_after_the_good_ones(tmp_path):
    """Elements before a broken one are read first: the error comes when the reader reaches it."""
    path = write(tmp_path, "a.json", "[1, 2, oops, 4]")
    got = []
    with pytest.raises(InputError, match="column 8: Expecting value"), open_input(path) as source:
        for item in source:
            got.append(item)
    assert got == [1, 2]


def test_empty_array_gives_nothing(tmp_path):
    """An empty array is a valid input with no items."""
    assert read(write(tmp_path, "a.json", " [ ]\n")) == []


# -- a bad line mid-run, and rejects files fed back ------------------------------------------


def test_chunked_gives_the_items_before_a_bad_line_then_raises(tmp_path):
    """The items before a bad line come as a short chunk; the error is raised at the next pull."""
    path = write(tmp_path, "a.jsonl", "".join(f"{i}\n" for i in range(7)) + "{bad\n8\n")
    with open_input(path) as source:
        chunks = chunked(source, 3)
        assert [next(chunks).items for _ in range(3)] == [[0, 1, 2], [3, 4, 5], [6]]
        with pytest.raises(InputError) as error:
            next(chunks)
    assert error.value.line == 8


def test_rejects_file_leaves_out_items_that_may_have_been_written(tmp_path):
    """A rejects line marked unsafe (its COMMIT outcome is unknown) is not fed again unless asked."""
    lines = [
        {"index": 0, "item": "a", "exc_type": "ValueError", "message": "no"},
        {"index": 1, "item": "b", "exc_type": "bulkpool.CommitUnknown", "message": "?", "unsafe": True},
        {"index": 2, "item": "c", "exc_type": "ValueError", "message": "no", "run_id": "r"},
    ]
    path = write(tmp_path, "rejects.jsonl", "".join(json.dumps(line) + "\n" for line in lines))
    with open_input(path) as source:
        assert list(source) == ["a", "c"]
    assert source.unsafe_skipped == 1
    with open_input(path, include_unsafe=True) as source:
        assert list(source) == ["a", "b", "c"]


def _json_error_column(text: str) -> int:
    try:
        json.loads(text)
    except json.JSONDecodeError as error:
        return error.colno
    raise AssertionError(f"{text!r} is valid JSON")


# -- the right line for every error, skipping bad lines, lines and bytes for the caller -----


@pytest.mark.parametrize("name", ["big.csv", "big.jsonl"])
def test_a_byte_that_is_not_utf8_is_reported_on_its_own_line(tmp_path, name):
    """Far into a file (past any read-ahead buffer), a bad byte is reported on its own line."""
    if name.endswith(".csv"):
        lines = [b"name,email\n"] + [f"user{i},u{i}@example.com\n".encode() for i in range(1, 20001)]
    else:
        lines = [json.dumps({"n": i}).encode() + b"\n" for i in range(1, 20002)]
    lines[20001 - 1] = lines[20001 - 1][:3] + b"\xff" + lines[20001 - 1][4:]  # line 20001
    path = write(tmp_path, name, b"".join(lines))
    error = error_of(path)
    assert error.line == 20001, error
    assert "not UTF-8" in str(error)


def test_a_bad_byte_in_a_json_array_is_reported_on_its_line(tmp_path):
    """A JSON array is read in blocks; a bad byte in a late block still names its line."""
    elements = [json.dumps({"n": i}).encode() for i in range(30000)]
    elements[25000] = b'{"n": "\xff"}'
    path = write(tmp_path, "big.json", b"[\n" + b",\n".join(elements) + b"\n]\n")
    error = error_of(path)
    assert error.line == 25002  # "[" is line 1, element 0 is line 2


def test_skip_gives_unreadable_items_in_place_of_bad_lines(tmp_path):
    """on_bad_line="skip": bad lines come as Unreadable items with their line; the rest go on."""
    from bulkpool.protocol import Unreadable

    path = write(tmp_path, "a.jsonl", '1\n{oops\n3\n"\xe9"\n')
    path.write_bytes(path.read_bytes().replace("\xe9".encode(), b"\xff"))
    with open_input(path, on_bad_line="skip") as source:
        items = list(source)
    assert items[0] == 1 and items[2] == 3
    assert isinstance(items[1], Unreadable) and items[1].line == 2 and items[1].text == "{oops"
    assert isinstance(items[3], Unreadable) and items[3].line == 4
    assert "not valid JSON" in items[1].error.message and "not UTF-8" in items[3].error.message


def test_skip_in_csv_covers_rows_with_the_wrong_number_of_fields(tmp_path):
    """A CSV row with too many fields is skipped as one Unreadable item naming its line."""
    from bulkpool.protocol import Unreadable

    path = write(tmp_path, "a.csv", "a,b\n1,2\n3,4,5\n6,7\n")
    with open_input(path, on_bad_line="skip") as source:
        items = list(source)
    assert items[0] == {"a": "1", "b": "2"} and items[2] == {"a": "6", "b": "7"}
    assert isinstance(items[1], Unreadable) and items[1].line == 3


def test_line_of_an_item_counts_headers_blank_lines_and_multiline_fields(tmp_path):
    """line_of(index) is the line an item started on, whatever came before it."""
    path = write(tmp_path, "a.csv", 'a,b\n1,2\n\n"x\ny",3\n4,5\n')
    with open_input(path) as source:
        items = list(source)
        assert [source.line_of(i) for i in range(len(items))] == [2, 4, 6]


def test_size_and_position_are_in_bytes(tmp_path):
    """A file's size is known up front and the position reaches it: a progress bar's total."""
    path = write(tmp_path, "a.jsonl", "".join(f"{i}\n" for i in range(1000)))
    with open_input(path) as source:
        assert source.size == path.stat().st_size
        list(source)
        assert source.position == source.size


# -- a quote that is never closed, CSV dialects, long fields, line endings -----------------


def test_skip_reads_on_after_a_quote_that_is_never_closed(tmp_path):
    """on_bad_line="skip": the line opening a quote that is never closed is skipped alone; the
    rows after it, which the quote swallowed, are read again as rows (issue 15, point 3)."""
    from bulkpool.protocol import Unreadable

    path = write(tmp_path, "a.csv", 'name\nok1\nbad"quote\n"unterminated,b\nok2\nok3\nok4\n')
    with open_input(path, on_bad_line="skip") as source:
        items = list(source)
        lines = [source.line_of(i) for i in range(len(items))]
    names = [item["name"] if isinstance(item, dict) else None for item in items]
    assert names == ["ok1", 'bad"quote', None, "ok2", "ok3", "ok4"]
    bad = items[2]
    assert isinstance(bad, Unreadable) and bad.line == 4 and bad.text == '"unterminated,b'
    assert "quote opened on line 4 is never closed" in bad.error.message
    assert lines == [2, 3, 4, 5, 6, 7]


def test_an_unclosed_quote_met_by_a_later_quote_skips_the_lines_between_named(tmp_path):
    """A quote never closed until a later field's quote: the lines of that record are skipped
    together, named by their range with their text, and reading goes on after them."""
    from bulkpool.protocol import Unreadable

    path = write(tmp_path, "a.csv", 'a,b\n"x,1\n2,3\n"y",4\n5,6\n')
    with open_input(path, on_bad_line="skip") as source:
        items = list(source)
    assert len(items) == 2 and items[1] == {"a": "5", "b": "6"}
    assert isinstance(items[0], Unreadable) and items[0].line == 2
    assert items[0].text == '"x,1\n2,3\n"y",4'
    assert "lines 2-4: not valid CSV" in items[0].error.message


def test_an_unclosed_quote_stops_the_run_at_its_line(tmp_path):
    """By default a quote that is never closed is an error naming the line it opens on."""
    error = error_of(write(tmp_path, "a.csv", 'name\nok1\n"unterminated\nok2\n'))
    assert error.line == 3
    assert "line 3: a quote opened on line 3 is never closed" in str(error)
    assert 'on_bad_line="skip" (--on-bad-line skip)' in str(error)


def test_a_broken_record_over_several_lines_is_skipped_whole_and_named(tmp_path):
    """A quoted field that spans lines and then breaks (text after its closing quote): the
    lines of that record are one unreadable item, named by their range, and reading goes on."""
    from bulkpool.protocol import Unreadable

    path = write(tmp_path, "a.csv", 'a,b\n1,"two\nlines" oops,3\n4,5\n')
    with open_input(path, on_bad_line="skip") as source:
        items = list(source)
    assert items[1] == {"a": "4", "b": "5"}
    assert isinstance(items[0], Unreadable) and items[0].line == 2
    assert items[0].text == '1,"two\nlines" oops,3'
    assert "lines 2-3:" in items[0].error.message


def test_every_bad_line_error_says_how_to_skip_such_lines(tmp_path):
    """The error that stops a run at a bad line names on_bad_line="skip" and --on-bad-line skip."""
    for name, text in [("a.csv", "a,b\n1,2,3\n"), ("a.csv", 'a\n"x"y\n'), ("a.jsonl", "{oops\n")]:
        message = str(error_of(write(tmp_path, name, text)))
        assert 'on_bad_line="skip" (--on-bad-line skip)' in message, message


@pytest.mark.parametrize(("separator", "word"), [(";", "semicolon"), ("|", "pipe"), ("\t", "tab")])
def test_a_one_column_header_holding_a_separator_is_refused(tmp_path, separator, word):
    """A header read as one column that holds ; | or a tab: the error names the delimiter to pass."""
    path = write(tmp_path, "a.csv", f"name{separator}email\nada{separator}a@x\n")
    error = error_of(path)
    assert error.line == 1
    assert f"looks like a {word}-delimited file" in str(error)
    assert f"delimiter={separator!r}" in str(error)
    with open_input(path, delimiter=separator) as source:
        assert list(source) == [{"name": "ada", "email": "a@x"}]


def test_a_given_delimiter_lets_a_one_column_file_be(tmp_path):
    """With the delimiter given, a single column whose name holds ';' is taken as it is."""
    path = write(tmp_path, "a.csv", "a;b\n1;2\n")
    with open_input(path, delimiter=",") as source:
        assert list(source) == [{"a;b": "1;2"}]


def test_a_bad_delimiter_is_refused():
    """The delimiter is one character, not a quote or a line break."""
    for bad in ["", ";;", '"', "\n"]:
        with pytest.raises(InputError, match="delimiter"):
            open_input("-", "csv", delimiter=bad)


def test_a_long_field_names_the_limit_and_how_to_raise_it(tmp_path):
    """A field over csv's limit is refused with the option that raises it; raised, it is read."""
    import csv

    big = "x" * 200_000
    path = write(tmp_path, "a.csv", f"a,b\n1,{big}\n2,y\n")
    error = error_of(path)
    assert error.line == 2
    assert "field_size_limit=" in str(error) and "--field-size-limit" in str(error)
    before = csv.field_size_limit()
    with open_input(path, field_size_limit=300_000) as source:
        assert list(source) == [{"a": "1", "b": big}, {"a": "2", "b": "y"}]
    assert csv.field_size_limit() == before  # csv's limit is global: it is put back


def test_a_long_field_stops_even_when_skipping(tmp_path):
    """Past the limit bulkpool cannot tell a long field from a quote never closed: it stops."""
    path = write(tmp_path, "a.csv", 'a,b\n1,"' + "x\n" * 70_000 + '"\n2,y\n')
    with pytest.raises(InputError, match="field_size_limit"), open_input(path, on_bad_line="skip") as source:
        list(source)


@pytest.mark.parametrize("name", ["a.csv", "a.jsonl"])
def test_bare_carriage_returns_end_lines(tmp_path, name):
    """Old Mac line endings (a bare CR) are read as line ends, as Python's universal newlines do."""
    text = "a,b\r1,2\r3,4\r" if name == "a.csv" else "1\r2\r\n3\n"
    with open_input(write(tmp_path, name, text.encode())) as source:
        items = list(source)
        assert [source.line_of(i) for i in range(len(items))] == ([2, 3] if name == "a.csv" else [1, 2, 3])
    assert items == ([{"a": "1", "b": "2"}, {"a": "3", "b": "4"}] if name == "a.csv" else [1, 2, 3])


def test_a_quoted_field_keeps_its_line_breaks_whatever_they_are(tmp_path):
    """CR, LF and CRLF inside a quoted field stay in the field."""
    path = write(tmp_path, "a.csv", b'a,b\r\n1,"x\ry\r\nz"\r\n2,w\r\n')
    assert read(path) == [{"a": "1", "b": "x\ry\r\nz"}, {"a": "2", "b": "w"}]


def test_csv_options_are_refused_for_other_formats(tmp_path):
    """delimiter= and field_size_limit= on a JSON Lines file are refused, not silently ignored."""
    path = write(tmp_path, "a.jsonl", "1\n")
    with pytest.raises(InputError, match="delimiter= applies to CSV files only"):
        open_input(path, delimiter=";")
    with pytest.raises(InputError, match="field_size_limit= applies to CSV files only"):
        open_input(path, field_size_limit=10)


def test_a_line_read_again_after_an_unclosed_quote_keeps_its_own_problem(tmp_path):
    """A line that is not UTF-8, among those read again after a quote never closed, is still
    reported as not UTF-8 (not given as a row with replacement characters)."""
    from bulkpool.protocol import Unreadable

    path = write(tmp_path, "a.csv", b'a\n"open\nok\nbad\xff\nlast\n')
    with open_input(path, on_bad_line="skip") as source:
        items = list(source)
    assert items[1] == {"a": "ok"} and items[3] == {"a": "last"}
    assert isinstance(items[0], Unreadable) and items[0].line == 2
    assert isinstance(items[2], Unreadable) and items[2].line == 4 and "not UTF-8" in items[2].error.message
