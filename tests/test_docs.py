"""The documentation cites only files that are in the repository.

Every Markdown page (README.md, CHANGELOG.md, docs/, bench/README.md) is read for
- relative links, ``[text](target)``: the target must exist, relative to the page;
- code spans that name a repository path, such as ``tests/faults/driver.py`` or a bare
  ``protocol.py``: the path must exist from the repository's root (a bare file name somewhere
  in the tree). ``bulkpool/operations.py`` is checked too, and fails: it is
  ``src/bulkpool/operations.py``.
Paths of the user's own files (``users.csv``, ``/tmp/f.jsonl``) are not repository paths
and are left alone: only spans starting with a top-level folder of the repository, or bare
names ending in a source extension, are checked.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted(
    [ROOT / "README.md", ROOT / "CHANGELOG.md", ROOT / "bench" / "README.md", *(ROOT / "docs").rglob("*.md")]
)
TOP_LEVEL = ("src/", "tests/", "docs/", "bench/", "examples/", "scripts/", ".ci/", "bulkpool/")
SOURCE_SUFFIXES = (".py", ".md", ".toml", ".yml", ".yaml", ".html", ".sh", ".cfg")
SEARCHED = ("src", "tests", "docs", "bench", "examples", "scripts")

LINK = re.compile(r"\]\(([^)\s]+)\)")
CODE_SPAN = re.compile(r"`([^`\s]+)`")
PATH_LIKE = re.compile(r"[\w.\-/]+")


def cited_paths(text: str) -> list[str]:
    cited = []
    for span in CODE_SPAN.findall(text):
        if not PATH_LIKE.fullmatch(span):
            continue
        if span.startswith(TOP_LEVEL) or ("/" not in span and span.endswith(SOURCE_SUFFIXES)):
            cited.append(span)
    cited += [
        span for span in ("README.md", "CHANGELOG.md", "pyproject.toml", "mkdocs.yml") if f"`{span}`" in text
    ]
    return cited


def exists(path: str, page: Path) -> bool:
    if (ROOT / path).exists() or (page.parent / path).exists():
        return True
    if "/" not in path:  # a bare file name, e.g. `protocol.py`: anywhere in the tree
        return any(next((ROOT / folder).rglob(path), None) for folder in SEARCHED)
    return False


@pytest.mark.parametrize("page", PAGES, ids=[str(page.relative_to(ROOT)) for page in PAGES])
def test_every_file_a_page_cites_is_in_the_repository(page):
    """Links and cited paths resolve to files of this repository."""
    text = page.read_text()
    missing = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue  # a URL, or an anchor on the same page
        if not (page.parent / target.split("#")[0]).exists():
            missing.append(f"link {target}")
    missing += [f"`{path}`" for path in cited_paths(text) if not exists(path, page)]
    assert not missing, f"{page.relative_to(ROOT)} cites what is not in the repository: {', '.join(missing)}"


def test_the_check_finds_a_missing_file(tmp_path):
    """The check itself: a made-up path and a broken link are reported, real ones are not."""
    page = tmp_path / "page.md"
    text = (
        "See `tests/nowhere.py`, `src/bulkpool/operations.py`, `bulkpool/api.py`, `protocol.py`, "
        "[x](missing.md), `users.csv`."
    )
    missing = [path for path in cited_paths(text) if not exists(path, page)]
    assert missing == ["tests/nowhere.py", "bulkpool/api.py"]
    assert LINK.findall(text) == ["missing.md"]


def test_the_api_reference_covers_every_public_name():
    """docs/reference.md renders each name of bulkpool.__all__ (and nothing that is not there)."""
    import bulkpool

    documented = re.findall(r"^::: bulkpool\.(\w+)$", (ROOT / "docs" / "reference.md").read_text(), re.M)
    assert sorted(documented) == sorted(bulkpool.__all__)


def _options_table_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("options_table", ROOT / "scripts" / "options_table.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_api_reference_lists_every_option_as_the_options_table_has_it():
    """docs/reference.md's options table is what scripts/options_table.py writes from
    bulkpool.options: every option, its default, its flag and its help, in order."""
    from bulkpool.options import table

    script = _options_table_script()
    text = (ROOT / "docs" / "reference.md").read_text()
    assert script.page_with_table(text) == text, "run: python scripts/options_table.py"
    region = text.split(script.START)[1].split(script.END)[0]
    listed = re.findall(r"^\| `(\w+)` \|", region, re.M)
    assert listed == [option.name for option in table()]


def test_the_options_check_finds_a_stale_table():
    """The check itself: a table missing a row, or missing markers, is found."""
    script = _options_table_script()
    text = (ROOT / "docs" / "reference.md").read_text()
    stale = re.sub(r"^\| `dry_run` \|.*\n", "", text, flags=re.M)
    assert stale != text and script.page_with_table(stale) == text
    with pytest.raises(SystemExit, match="markers"):
        script.page_with_table("# no table here")


def test_the_readme_options_table_names_every_option():
    """README.md's options table (hand-written, with examples) has a row for every option."""
    from bulkpool.options import table

    readme = (ROOT / "README.md").read_text()
    listed = set(re.findall(r"^\| `(\w+)` \|", readme, re.M))
    missing = [option.name for option in table() if option.name not in listed]
    assert not missing, f"README.md's options table lacks {missing}"
