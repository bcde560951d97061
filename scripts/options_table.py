"""The options of ``bulkpool.run`` as a Markdown table, from the one table in ``bulkpool.options``.

    python scripts/options_table.py            # rewrite the table in docs/reference.md
    python scripts/options_table.py --check    # exit 1 if the page and the options differ

The table sits between two markers in docs/reference.md; tests/test_docs.py checks that it
is what this script writes, so an option added to ``Options`` is in the reference.
"""

from __future__ import annotations

import sys
from dataclasses import MISSING, Field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "reference.md"
START = "<!-- options-table:start (written by scripts/options_table.py) -->"
END = "<!-- options-table:end -->"


def table() -> str:
    """One row per option: keyword and default, command-line flag, meaning."""
    from bulkpool.options import table as options

    rows = ["| option | default | command line | meaning |", "|---|---|---|---|"]
    for option in options():
        cells = [f"`{option.name}`", _default(option), _flag(option), _escape(option.metadata["help"])]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _default(option: Field[Any]) -> str:
    value = option.default if option.default is not MISSING else None
    return f"`{value!r}`".replace("'", '"')


def _flag(option: Field[Any]) -> str:
    meta = option.metadata
    flag = "--" + option.name.replace("_", "-")
    if meta["cli"] is None:
        return "-"
    if meta["cli"] == "flag":
        return f"`{flag}`"
    if meta["cli"] == "switch":
        return f"`{flag}` / `--no-{flag[2:]}`"
    # Alternatives in braces, as argparse writes choices: a "|" would end the cell on GitHub.
    if meta.get("choices"):
        value = "{" + ",".join(meta["choices"]) + "}"
    else:
        metavar = meta.get("metavar", "VALUE")
        value = "{" + metavar.replace("|", ",") + "}" if "|" in metavar else metavar
    return f"`{flag} {value}`"


def _escape(text: str) -> str:
    return text.replace("|", "\\|")


def page_with_table(text: str) -> str:
    """``text`` (docs/reference.md) with the table between its markers rewritten."""
    before, found, rest = text.partition(START)
    if not found or END not in rest:
        raise SystemExit(f"{PAGE}: the markers {START!r} and {END!r} are missing")
    return f"{before}{START}\n{table()}\n{END}{rest.split(END, 1)[1]}"


def main(argv: list[str]) -> int:
    import django
    from django.conf import settings

    if not settings.configured:  # the options table reads DEFAULT_DB_ALIAS only, no database
        settings.configure()
        django.setup()
    text = PAGE.read_text(encoding="utf-8")
    wanted = page_with_table(text)
    if "--check" in argv:
        if wanted != text:
            print(f"{PAGE} differs from the options: run python scripts/options_table.py", file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(wanted, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
