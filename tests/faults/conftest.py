"""Print the fault suite's figures (items expected / written / duplicated) at the end of the session."""

from __future__ import annotations

from tests.faults.support import FIGURES

COLUMNS = (
    "fault",
    "database",
    "expected",
    "written",
    "duplicated",
    "unexpected",
    "ok",
    "failed",
    "commit_unknown",
    "retried",
    "skipped",
)


def pytest_terminal_summary(terminalreporter) -> None:
    if not FIGURES:
        return
    terminalreporter.write_sep("=", "fault figures")
    extra = sorted({key for row in FIGURES for key in row} - set(COLUMNS))
    columns = [*COLUMNS, *extra]
    terminalreporter.write_line("| " + " | ".join(columns) + " |")
    for row in FIGURES:
        terminalreporter.write_line("| " + " | ".join(str(row.get(column, "")) for column in columns) + " |")
