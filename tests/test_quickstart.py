"""The README's "Install into your project", run as written in a fresh ``startproject``.

Each block after a ``<!-- quickstart:NAME -->`` marker in README.md is used as it stands:
the settings line is appended to the new project's settings, the files are written, and the
commands run with this interpreter first on PATH (as ``python``).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCK = re.compile(r"<!-- quickstart:(?P<name>\S+) -->\n```\w*\n(?P<body>.*?)```", re.DOTALL)


def blocks() -> dict[str, str]:
    return {match["name"]: match["body"] for match in BLOCK.finditer(README.read_text())}


def sh(command: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))
    env.pop("DJANGO_SETTINGS_MODULE", None)  # the new project's manage.py sets its own
    env.pop("DATABASE_URL", None)
    return subprocess.run(
        ["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=180
    )


def new_project(root: Path, quickstart: dict[str, str]) -> Path:
    """startproject + startapp myapp, then the README's settings, files and migrate."""
    assert sh("python -m django startproject mysite .", root).returncode == 0
    assert sh("python manage.py startapp myapp", root).returncode == 0
    settings = root / "mysite" / "settings.py"
    settings.write_text(settings.read_text() + '\nINSTALLED_APPS += ["myapp"]\n' + quickstart["settings"])
    for name in ("myapp/jobs.py", "users.csv"):
        (root / name).write_text(quickstart[name])
    migrated = sh(quickstart["migrate"], root)
    assert migrated.returncode == 0, migrated.stderr
    assert "Applying bulkpool.0001_initial... OK" in migrated.stdout
    return root


@pytest.mark.slow
@pytest.mark.vendor("sqlite")  # the project brings its own SQLite file: run it once, not per server
def test_readme_quickstart_works_as_pasted(tmp_path):
    """The command and the shell snippet of the README each write the good rows and report the bad one."""
    quickstart = blocks()
    assert set(quickstart) == {"settings", "migrate", "myapp/jobs.py", "users.csv", "command", "shell"}

    (tmp_path / "cli").mkdir()
    project = new_project(tmp_path / "cli", quickstart)
    ran = sh(quickstart["command"], project)
    assert ran.returncode == 1, ran.stderr  # one item failed
    assert "bulkpool: 3 items: 2 ok, 1 failed" in ran.stdout, ran.stdout + ran.stderr
    assert "IntegrityError" in ran.stdout and "Traceback" not in ran.stderr
    again = sh(quickstart["command"], project)
    assert "skipped (already done)" in again.stdout, again.stdout + again.stderr

    (tmp_path / "shell").mkdir()
    project = new_project(tmp_path / "shell", quickstart)
    shell = sh(f"python manage.py shell -c {shlex.quote(quickstart['shell'])}", project)
    assert shell.returncode == 0, shell.stderr
    assert "bulkpool: 3 items: 2 ok, 1 failed" in shell.stdout, shell.stdout + shell.stderr
    users = sh(
        "python manage.py shell -c 'from django.contrib.auth.models import User; "
        'print(sorted(User.objects.values_list("username", flat=True)))\'',
        project,
    )
    assert users.stdout.strip().splitlines()[-1] == "['ann', 'bob']", users.stdout + users.stderr
