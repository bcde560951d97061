"""The installed package: its version, and the files it needs besides its modules.

scripts/test with ``PACKAGE=1`` builds the sdist and the wheel, installs the wheel into a
fresh virtualenv and runs the whole suite there with ``BULKPOOL_TEST_WHEEL=1``: then these
tests also check that ``bulkpool`` really comes from that wheel, not from ``src/``.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
from importlib.resources import files
from pathlib import Path

import pytest

import bulkpool

ROOT = Path(__file__).resolve().parent.parent
DATA_FILES = [
    "py.typed",
    "migrations/0001_initial.py",
    "migrations/0002_run_command.py",
    "templates/admin/bulkpool/run/change_form.html",
]


def test_version_comes_from_the_package_metadata():
    """bulkpool.__version__ is the installed distribution's version, the one pyproject.toml gives."""
    declared = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.MULTILINE)
    assert declared is not None
    assert bulkpool.__version__ == importlib.metadata.version("django-bulkpool") == declared[1]


@pytest.mark.parametrize("name", DATA_FILES)
def test_the_package_ships_its_data_files(name):
    """Migrations, templates and py.typed are in the installed package."""
    assert files("bulkpool").joinpath(name).is_file()


def test_every_migration_is_shipped():
    """Each migration of the source tree is in the installed package (a new one is not forgotten)."""
    in_tree = {path.name for path in (ROOT / "src/bulkpool/migrations").glob("0*.py")}
    installed = {entry.name for entry in files("bulkpool").joinpath("migrations").iterdir()}
    assert in_tree <= installed


@pytest.mark.skipif(os.environ.get("BULKPOOL_TEST_WHEEL") != "1", reason="only when testing the built wheel")
def test_bulkpool_is_imported_from_the_built_wheel():
    """With BULKPOOL_TEST_WHEEL=1 the tests run against an installed wheel, not the source tree."""
    location = Path(bulkpool.__file__).resolve()
    assert ROOT / "src" not in location.parents, location
    direct_url = importlib.metadata.distribution("django-bulkpool").read_text("direct_url.json")
    assert direct_url is not None and json.loads(direct_url)["url"].endswith(".whl")
