"""Render the fault suite's figures as the Markdown table of ``docs/faults.md``.

Run the suite once per database with ``BULKPOOL_FAULT_FIGURES=/tmp/figures.jsonl`` (the
rows are appended to that file), then ``python -m tests.faults.figures /tmp/figures.jsonl``.
"""

from __future__ import annotations

import json
import sys

DATABASES = {"sqlite": "SQLite", "postgresql": "PostgreSQL", "mysql": "MariaDB"}


def table(rows: list[dict[str, object]]) -> str:
    lines = [
        "| fault | database | expected | written | duplicated | reported ok / failed (unknown) | "
        "retried | skipped |",
        "|---|---|---:|---:|---:|---|---:|---:|",
    ]
    for row in rows:
        reported = "" if "ok" not in row else f"{row['ok']} / {row['failed']} ({row['commit_unknown']})"
        lines.append(
            f"| {row['fault']} | {DATABASES.get(str(row['database']), row['database'])} | "
            f"{row['expected']} | {row['written']} | {row['duplicated']} | {reported} | "
            f"{row.get('retried', '')} | {row.get('skipped', '')} |"
        )
    return "\n".join(lines)


def main(paths: list[str]) -> None:
    rows: list[dict[str, object]] = []
    for path in paths:
        with open(path, encoding="utf-8") as file:
            rows.extend(json.loads(line) for line in file if line.strip())
    order = list(DATABASES)
    rows.sort(key=lambda row: order.index(str(row["database"])))  # stable: test order within a database
    print(table(rows))


if __name__ == "__main__":
    main(sys.argv[1:])
