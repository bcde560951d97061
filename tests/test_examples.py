"""The README's first command: ``examples/demo.py`` on its own SQLite file."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

DEMO = Path(__file__).resolve().parent.parent / "examples" / "demo.py"


@pytest.mark.vendor("sqlite")  # the demo brings its own SQLite database: run it once, not per server
@pytest.mark.parametrize("backend", ["serial", "process"])
def test_demo_writes_every_user_with_its_profile_and_reports_the_duplicates(tmp_path, backend):
    database = tmp_path / "demo.sqlite3"
    command = [sys.executable, str(DEMO), "--items", "3000", "--backend", backend]
    command += ["--database", str(database)]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=120)

    assert finished.returncode == 0, finished.stderr
    assert "Traceback" not in finished.stderr
    # Rows 999, 1999 and 2999 repeat the username of the row before. Serially the repeat
    # fails; on a pool the two rows may run at once on two workers, and whichever is
    # written second fails. Either way each repeated name fails once, and nothing else fails.
    failed = re.findall(r"- item (\d+) \(\{'username': '(\w+)'.*IntegrityError", finished.stdout)
    assert [name for _, name in failed] == ["user00998", "user01998", "user02998"], finished.stdout
    for index, name in failed:
        assert int(index) in (int(name[4:]), int(name[4:]) + 1), finished.stdout
    if backend == "serial":
        assert [index for index, _ in failed] == ["999", "1999", "2999"], finished.stdout
    assert "3,000 items: 2,997 ok, 3 failed" in finished.stdout
    assert "In the database: 2,997 users, 2,997 profiles." in finished.stdout
    assert "3000/3000" in finished.stderr  # the progress bar knew its total
