"""The layers contract (pyproject.toml's [tool.importlinter], run by scripts/test) names every module."""

from __future__ import annotations

import pkgutil
import re
from pathlib import Path

import bulkpool

ROOT = Path(__file__).resolve().parent.parent


def test_every_module_of_bulkpool_has_a_layer():
    """A module left out of the layers would be free to import anything: each one is named."""
    # tomllib is Python 3.11+: the one list of the contract is read with a pattern.
    (block,) = re.findall(r"^layers = \[(.*?)^\]", (ROOT / "pyproject.toml").read_text(), re.M | re.S)
    layers = re.findall(r'"([^"]+)"', block)
    named = {name.strip() for layer in layers for name in re.split(r"[|:]", layer)}
    modules = {info.name for info in pkgutil.iter_modules(bulkpool.__path__)}
    assert modules - named == set(), "add these modules to a layer in pyproject.toml"
    assert named - modules == set(), "these layers name no module"
