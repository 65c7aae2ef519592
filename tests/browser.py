"""A real headless Chromium for the UI and HTML-report tests (scripts/peers/browser.sh).

Selenium drives Debian's ``chromium`` through its ``chromedriver``; both paths are given
explicitly, so Selenium never looks for (or downloads) a browser or driver of its own.  The flags
keep Chromium off the network: this machine has none, and a browser that tries reaches nothing
but slows every start (background networking, component updates, sync).

``browser`` is one Chromium per test module (starting one costs ~0.5-1 s); each test gets it
back on ``about:blank``.  ``screenshot(driver, path)`` saves a PNG of the whole page, for the
pictures in docs/.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.peers import require_peer

CHROMIUM = os.environ.get("UPSTREAM_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("UPSTREAM_CHROMEDRIVER", "/usr/bin/chromedriver")
FLAGS = (
    "--headless=new",
    "--no-sandbox",  # CI runs as root, where Chromium's sandbox cannot start
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--window-size=1280,900",
)


def start_chromium(profile: Path) -> Any:
    """A headless Chromium with its own empty profile directory."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    driver.set_script_timeout(30)
    return driver


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    require_peer(CHROMIUM, CHROMEDRIVER, install="scripts/peers/browser.sh")
    profile = Path(tempfile.mkdtemp(prefix="pytest-upstream-chromium-"))
    driver = start_chromium(profile)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    """The module's browser, on a blank page before and after the test."""
    browser.get("about:blank")
    yield browser
    browser.get("about:blank")


def screenshot(driver: Any, path: Path) -> None:
    """A PNG of the whole page (the window grown to the page's height, capped at 4,000 px)."""
    height = int(driver.execute_script("return document.documentElement.scrollHeight"))
    driver.set_window_size(1280, max(600, min(height, 4000)))
    path.parent.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(path))
    driver.set_window_size(1280, 900)
