"""The run journal's admin pages in a real browser: headless Chromium through chromedriver
(Debian's ``chromium`` and ``chromium-driver``), on a live server, as Django's own admin
tests do.

- ``BULKPOOL_BROWSER_TESTS=0``: skipped (CI runs them on one leg only);
- Chromium, chromedriver or selenium missing: skipped with the reason, except under
  ``CI=true``, where that is an error, since a CI run that skipped them would test nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import unittest
from pathlib import Path
from typing import Any

from django.contrib.auth.models import User
from django.contrib.staticfiles.testing import StaticLiveServerTestCase

from bulkpool.models import Run, RunChunk, RunFailure

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
OFF = os.environ.get("BULKPOOL_BROWSER_TESTS", "").strip() == "0"


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def _browser() -> tuple[str | None, str | None, str | None]:
    """(chromium, chromedriver, None), or (None, None, why they cannot be used)."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return None, None, "selenium is not installed (pip install -e '.[test]')"
    browser = next((path for name in BROWSERS if (path := shutil.which(name))), None)
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        missing = " and ".join(
            name for name, path in (("chromium", browser), ("chromedriver", driver)) if path is None
        )
        return None, None, f"{missing} not found: apt-get install chromium chromium-driver"
    return browser, driver, None


@unittest.skipIf(OFF, "browser tests are off here (BULKPOOL_BROWSER_TESTS=0)")
class RunAdminInABrowser(StaticLiveServerTestCase):
    """Log in, list the runs, filter them, open one and see its failures."""

    driver: Any

    @classmethod
    def setUpClass(cls) -> None:
        browser, chromedriver, problem = _browser()
        if problem:
            if _in_ci():
                raise RuntimeError(f"CI=true and the browser test cannot run: {problem}")
            raise unittest.SkipTest(problem)
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        options = webdriver.ChromeOptions()
        options.binary_location = str(browser)
        for flag in (
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--window-size=1400,1000",
        ):
            options.add_argument(flag)
        super().setUpClass()
        try:
            cls.driver = webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)
        except Exception:
            super().tearDownClass()
            raise
        cls.driver.implicitly_wait(5)

    @classmethod
    def tearDownClass(cls) -> None:
        cls.driver.quit()
        super().tearDownClass()

    def setUp(self) -> None:
        User.objects.create_superuser("admin", "admin@example.com", "a-password")
        nightly = Run.objects.create(
            run_id="nightly-import",
            func="myapp.jobs.import_user",
            chunk_size=10,
            status=Run.Status.FINISHED,
            total=10,
            ok=7,
            failed=3,
            command=(
                "python manage.py bulkpool run myapp.jobs.import_user --input users.csv "
                "--run-id nightly-import"
            ),
        )
        chunk = RunChunk.objects.create(run=nightly, start=0, size=10, digest="x", ok=7, failed=3)
        for index in (2, 5, 8):
            RunFailure.objects.create(
                chunk=chunk,
                index=index,
                item=json.dumps({"username": f"user{index}"}),
                exc_type="django.db.utils.IntegrityError",
                message=f"duplicate key value violates unique constraint (user{index})",
                traceback="Traceback (most recent call last):\n  File ...",
            )
        Run.objects.create(
            run_id="weekly-sync", func="myapp.jobs.sync", chunk_size=100, status=Run.Status.INTERRUPTED
        )

    def screenshot(self, name: str, element: Any = None) -> None:
        """Keep a picture of the page (scrolled to ``element``) when BULKPOOL_BROWSER_SCREENSHOTS
        names a folder."""
        folder = os.environ.get("BULKPOOL_BROWSER_SCREENSHOTS")
        if folder:
            Path(folder).mkdir(parents=True, exist_ok=True)
            if element is not None:
                self.driver.execute_script("arguments[0].scrollIntoView()", element)
            self.driver.save_screenshot(str(Path(folder) / f"{name}.png"))

    def wait_for(self, css: str) -> Any:
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support import expected_conditions
        from selenium.webdriver.support.ui import WebDriverWait

        return WebDriverWait(self.driver, 10).until(
            expected_conditions.presence_of_element_located((By.CSS_SELECTOR, css))
        )

    def listed_run_ids(self) -> list[str]:
        from selenium.webdriver.common.by import By

        return [
            cell.text for cell in self.driver.find_elements(By.CSS_SELECTOR, "#result_list th.field-run_id")
        ]

    def test_log_in_filter_the_runs_and_open_one_to_see_its_failures(self) -> None:
        """A staff user logs in, filters the runs by status and reads a run's failed items."""
        from selenium.webdriver.common.by import By

        driver = self.driver
        driver.get(f"{self.live_server_url}/admin/login/?next=/admin/bulkpool/run/")
        driver.find_element(By.NAME, "username").send_keys("admin")
        driver.find_element(By.NAME, "password").send_keys("a-password")
        driver.find_element(By.CSS_SELECTOR, "input[type=submit]").click()

        self.wait_for("#result_list")
        self.screenshot("1-runs")
        self.assertEqual(sorted(self.listed_run_ids()), ["nightly-import", "weekly-sync"])

        driver.find_element(By.CSS_SELECTOR, "#changelist-filter").find_element(
            By.LINK_TEXT, "Interrupted"
        ).click()
        self.wait_for("#changelist-filter li.selected a[href*='status__exact=interrupted']")
        self.screenshot("2-interrupted")
        self.assertEqual(self.listed_run_ids(), ["weekly-sync"])

        driver.find_element(By.CSS_SELECTOR, "#changelist-filter").find_element(
            By.LINK_TEXT, "Finished"
        ).click()
        self.wait_for("#changelist-filter li.selected a[href*='status__exact=finished']")
        self.assertEqual(self.listed_run_ids(), ["nightly-import"])
        driver.find_element(By.LINK_TEXT, "nightly-import").click()

        failures = self.wait_for("#bulkpool-failures")
        self.screenshot("3-run")
        self.screenshot("4-run-failures", failures)
        self.assertIn("Failed items (3)", failures.text)
        rows = failures.find_elements(By.CSS_SELECTOR, "tr.bulkpool-failure")
        self.assertEqual([row.find_element(By.TAG_NAME, "td").text for row in rows], ["2", "5", "8"])
        self.assertIn("duplicate key value violates unique constraint (user5)", rows[1].text)
        # A finished run has nothing to resume: its recorded command is not offered.
        resume = driver.find_element(By.CSS_SELECTOR, ".field-resume_command").text
        self.assertIn("Finished: nothing to resume.", resume)
        self.assertNotIn("--run-id nightly-import", resume)
