"""The status page in a real headless browser: Debian's Chromium driven by Playwright (the
system executable; Playwright downloads nothing). It must render the jobs, the runs with their
problems highlighted and the held lock, refresh itself, filter, fit a phone, and force-unlock
only with the token and a confirmation. Screenshots are kept as test artifacts.

A missing Chromium fails the test when CI is set (the CI script installs it), and skips it
elsewhere with the reason.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dashboard_helpers import Served

import coordlock
import coordlock.dashboard
from coordlock.scheduler import ManualClock, Scheduler
from coordlock.testing.plugin import in_ci

TOKEN = "browser-token-" + "z" * 18
#: Flags for Chromium as root on a machine without a display or outside network.
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


def _unavailable(reason: str) -> None:
    if in_ci():
        pytest.fail(f"{reason} (CI is set: the page must be tested in a browser)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    if executable is None:
        _unavailable("Chromium is not installed: apt-get install chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("Playwright is not installed: pip install -e '.[dev]'")
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where screenshots go: $COORDLOCK_ARTIFACTS if set, else a pytest temporary folder."""
    where = os.environ.get("COORDLOCK_ARTIFACTS")
    folder = Path(where) if where else tmp_path_factory.mktemp("dashboard-artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def screenshot(page: Any, folder: Path, name: str) -> Path:
    path = folder / name
    page.screenshot(path=str(path), full_page=True)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    print(f"screenshot: {path}")
    return path


class Site:
    """A SQLite coordinator with real scheduler data, served by the dashboard."""

    def __init__(self, root: Path, refresh: float) -> None:
        self.coordinator = coordlock.connect(f"sqlite:///{root / 'site.db'}")
        clock = ManualClock(1_800_000_000.0)
        self.planner = Scheduler(self.coordinator, instance_id="web-1", clock=clock)
        self.app = coordlock.dashboard.app(
            self.coordinator, scheduler=self.planner, refresh=refresh
        )

        def sync_crm() -> None:
            raise ConnectionError("crm.internal timed out")

        self.planner.every(60, name="nightly-report")(lambda: None)
        self.planner.every(60, name="sync-crm")(sync_crm)
        self.planner.run_pending()
        clock.advance(60 * 3 + 5)
        self.planner.run_pending()  # missed ticks
        self.release = threading.Event()
        self.worker = Scheduler(
            self.coordinator, instance_id="web-2", clock=ManualClock(1_800_000_000.0)
        )
        self.worker.every(3600, name="rebuild-index", timeout=0.2)(
            lambda: self.release.wait(60)
        )
        self.worker.start()
        self.lease = self.coordinator.acquire("orders-export", 120)
        assert self.lease is not None
        deadline = time.monotonic() + 30
        while not any(r.status == "stuck" for r in self.coordinator.history("rebuild-index")):
            assert time.monotonic() < deadline, "rebuild-index was never reported stuck"
            time.sleep(0.05)

    def close(self) -> None:
        self.release.set()
        self.worker.stop(wait=True, timeout=30)
        self.lease.release()
        self.coordinator.close()


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Site]:
    monkeypatch.delenv(coordlock.dashboard.TOKEN_ENV, raising=False)
    s = Site(tmp_path, refresh=0.5)
    yield s
    s.close()


def test_page_shows_jobs_runs_problems_and_the_held_lock(
    browser: Any, site: Site, artifacts: Path
) -> None:
    with Served(site.app) as served:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(served.base + "/")
        page.click("#pause")  # no refresh swapping rows while they are inspected
        assert page.title() == "coordlock"
        headings = page.locator("main h2").all_inner_texts()
        assert headings == ["Instances", "Jobs", "Recent runs", "Held locks"]

        jobs = page.locator("table.jobs tbody tr")
        assert sorted(jobs.evaluate_all("rows => rows.map(r => r.dataset.job)")) == [
            "nightly-report", "rebuild-index", "sync-crm",
        ]  # fmt: skip
        crm = page.locator('table.jobs tr[data-job="sync-crm"]')
        assert "problem" in (crm.get_attribute("class") or "")
        assert "every 60s" in crm.inner_text()

        for status in ("failed", "stuck", "missed"):
            row = page.locator(f'table.runs tr[data-status="{status}"]').first
            assert row.is_visible(), status
            assert "problem" in (row.get_attribute("class") or ""), status
        failed = page.locator('table.runs tr[data-status="failed"]').first
        assert "crm.internal timed out" in failed.inner_text()
        ok = page.locator('table.runs tr[data-status="finished"]').first
        highlight = failed.evaluate("r => getComputedStyle(r).backgroundColor")
        plain = ok.evaluate("r => getComputedStyle(r).backgroundColor")
        assert highlight != plain  # problems really stand out

        lock = page.locator('table.locks tr[data-lock="orders-export"]')
        text = lock.inner_text()
        assert f":{os.getpid()}" in text and str(site.lease.fence) in text
        assert "Force unlock" not in page.content()  # read-only without a token
        assert page.locator('tr[data-instance="web-2"] .badge').inner_text() == "alive"
        screenshot(page, artifacts, "dashboard-desktop.png")
        page.close()


def test_page_refreshes_itself(browser: Any, site: Site) -> None:
    with Served(site.app) as served:
        page = browser.new_page()
        page.goto(served.base + "/")
        page.evaluate("window.__marker = 'same page'")
        assert page.locator('tr[data-lock="late-lock"]').count() == 0
        late = site.coordinator.acquire("late-lock", 60)
        assert late is not None
        page.wait_for_selector('tr[data-lock="late-lock"]', timeout=20_000)
        assert page.evaluate("window.__marker") == "same page"  # refreshed, not reloaded
        late.release()
        page.wait_for_selector('tr[data-lock="late-lock"]', state="detached", timeout=20_000)
        assert "updated" in page.locator("#status").inner_text()
        page.click("#pause")
        assert page.locator("#status").inner_text() == "paused"
        page.close()


def test_filters_narrow_the_runs(browser: Any, site: Site) -> None:
    with Served(site.app) as served:
        page = browser.new_page()
        page.goto(served.base + "/")
        with page.expect_navigation():
            page.select_option('select[name="status"]', "failed")
        assert "status=failed" in page.url
        statuses = page.locator("table.runs tbody tr").evaluate_all(
            "rows => rows.map(r => r.dataset.status)"
        )
        assert statuses and set(statuses) == {"failed"}
        with page.expect_navigation():
            page.select_option('select[name="job"]', "nightly-report")
        assert page.locator("table.runs tbody tr").count() == 0
        assert "No failed runs of nightly-report recorded." in page.inner_text("#runs")
        page.close()


def test_usable_on_a_phone(browser: Any, site: Site, artifacts: Path) -> None:
    with Served(site.app) as served:
        page = browser.new_page(viewport={"width": 390, "height": 844}, device_scale_factor=2)
        page.goto(served.base + "/")
        page.click("#pause")  # no refresh swapping rows while they are inspected
        overflow = page.evaluate(
            "document.documentElement.scrollWidth - document.documentElement.clientWidth"
        )
        assert overflow <= 0  # no sideways scrolling
        assert page.locator("table.runs thead").is_hidden()  # rows are cards
        label = page.locator("table.runs tbody tr td").first.evaluate(
            "td => getComputedStyle(td, '::before').content"
        )
        assert label == '"job"'
        screenshot(page, artifacts, "dashboard-phone.png")
        page.close()


def test_force_unlock_with_token_and_confirmation(
    browser: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(coordlock.dashboard.TOKEN_ENV, TOKEN)
    site = Site(tmp_path, refresh=30)
    try:
        with Served(site.app) as served:
            page = browser.new_page()
            page.goto(served.base + "/")
            row = 'table.locks tr[data-lock="orders-export"]'
            page.click(f"{row} button.unlock")  # no token typed yet
            assert "Enter the unlock token" in page.inner_text("#message")

            page.fill("#token", TOKEN)
            asked: list[str] = []

            def dismiss(dialog: Any) -> None:
                asked.append(dialog.message)
                dialog.dismiss()

            page.once("dialog", dismiss)
            page.click(f"{row} button.unlock")
            assert asked and "orders-export" in asked[0] and f":{os.getpid()}" in asked[0]
            assert site.lease.extend() is True  # declined: still held

            page.once("dialog", lambda dialog: dialog.accept())
            page.click(f"{row} button.unlock")
            page.wait_for_selector(row, state="detached", timeout=20_000)
            assert "Released" in page.inner_text("#message")
            assert "orders-export" not in [i.name for i in site.coordinator.locks()]
            assert site.lease.extend() is False and site.lease.lost
            page.close()
    finally:
        site.close()
