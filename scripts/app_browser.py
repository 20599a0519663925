"""The app in a real browser: `streamlit run app.py` headless on a free port, opened in Debian's headless Chromium
through playwright (no browser download: `executable_path` is the system's). Used by tests/test_app_browser.py
and scripts/app_screenshots.py.

    with served_app({"ALIGNER_APP_MODEL": "tiny"}) as url, browser_page() as page:
        open_app(page, url); open_tab(page, "Gates"); wait_for_chart(page)

`browser_pages(n)` opens n pages at once, each a session of its own (n users).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator, Mapping

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
# Headless in a container: no sandbox (we run as root), no GPU, and none of the browser's own network chatter.
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
]
CHART = ".js-plotly-plot"
EXCEPTION = '[data-testid="stException"]'
ERROR = '[data-testid="stAlertContentError"]'
RUNNING = '[data-testid="stStatusWidgetRunningIcon"]'  # shown while a script runs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def served_app(env: Mapping[str, str], startup_s: float = 120.0) -> Iterator[str]:
    """`streamlit run app.py` on a free port with `env` added to the environment; yields its URL once its health
    endpoint answers, and stops it afterwards. The server's output goes to a log whose end is shown if it dies."""
    port = free_port()
    command = [
        sys.executable, "-m", "streamlit", "run", str(ROOT / "app.py"), "--server.headless", "true",
        "--server.port", str(port), "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false",
        "--server.fileWatcherType", "none",
    ]
    log = open(ROOT / ".streamlit-server.log", "w+", encoding="utf-8")  # git-ignored
    server = subprocess.Popen(command, cwd=ROOT, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_s
        while True:
            if server.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"streamlit exited with {server.returncode}:\n{log.read()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"streamlit did not answer on {url} within {startup_s} s")
            time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


@contextlib.contextmanager
def browser_pages(n: int, width: int = 1280, height: int = 900) -> Iterator[list["Page"]]:  # noqa: F821 (playwright's Page)
    """`n` pages of one headless Chromium, each in a context of its own: to the app, `n` users' sessions."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield [browser.new_context(viewport={"width": width, "height": height}).new_page() for _ in range(n)]
        finally:
            browser.close()


@contextlib.contextmanager
def browser_page(width: int = 1280, height: int = 900) -> Iterator["Page"]:  # noqa: F821 (playwright's Page)
    with browser_pages(1, width, height) as pages:
        yield pages[0]


def wait_until_idle(page, timeout_s: float = 300.0, quiet_s: float = 1.5) -> float:
    """Wait until the app has run no script for `quiet_s` seconds in a row (the status widget, the running man,
    shows while a script runs, and a run may start a moment after the action that causes it, or cause another);
    return the time.monotonic() at which a script was last seen running (the call's start if none was)."""
    deadline = time.monotonic() + timeout_s
    quiet_since, last_running = None, time.monotonic()
    while True:
        now = time.monotonic()
        if page.locator(RUNNING).count():
            quiet_since, last_running = None, now
        elif quiet_since is None:
            quiet_since = now
        elif now - quiet_since >= quiet_s:
            return last_running
        if now > deadline:
            raise TimeoutError(f"the app was still running after {timeout_s} s")
        page.wait_for_timeout(100)


def open_app(page, url: str, timeout_s: float = 300.0) -> float:
    """Load the app and wait until its first script run is over; return when it was last seen running."""
    page.goto(url)
    page.get_by_role("heading", name="Aligner workbench").wait_for(timeout=timeout_s * 1000)
    return wait_until_idle(page, timeout_s)


def wait_for_chart(page, timeout_s: float = 300.0) -> None:
    """Wait until a plotly chart is drawn in the open tab."""
    page.locator(f'[role="tabpanel"]:not([hidden]) {CHART}').first.wait_for(state="visible", timeout=timeout_s * 1000)


def open_tab(page, name: str, timeout_s: float = 300.0) -> float:
    """Click the tab and wait until the script run it starts is over; return when it was last seen running."""
    page.get_by_role("tab", name=name).click()
    return wait_until_idle(page, timeout_s)


def errors(page) -> list[str]:
    """The text of every error element (`st.error`) on the page."""
    return page.locator(ERROR).all_inner_texts()


def exceptions(page) -> list[str]:
    """The text of every Streamlit exception block on the page (a traceback the app failed to turn into an error)."""
    return page.locator(EXCEPTION).all_inner_texts()
