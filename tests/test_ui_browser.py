"""``/-/ui/`` in a real headless Chromium (docs/ui.md): after real pip and real npm recorded
through the proxy, the pages list what they fetched, the filter narrows the list as one types,
a click shows the digest; hostile names render as text; sort and pagination work; a browser
opens a token-protected ``serve`` with ``?token=`` once and its cookie after that."""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fixtures.build_wheels import Dist
from pytest_upstream.store.cache import Cache

from .browser import browser, page, screenshot  # noqa: F401 (fixtures)
from .conftest import MakeProxy, proxy_def
from .peers import pypiserver, serve_process
from .pip_setup import pip_env, pip_install, publish
from .test_npm import npm_user, verdaccio  # noqa: F401 (verdaccio: a fixture)
from .test_rules_clients import installed_version, npm_publish
from .test_ui import HOSTILE_NAME, HOSTILE_VERSION, put

pytestmark = pytest.mark.slow

DEMO = [
    Dist("upstream-demo-a", "1.0", requires=["upstream-demo-b>=1.0"], code="VALUE = 'a'\n"),
    Dist("upstream-demo-b", "1.0", code="VALUE = 'b'\n"),
]
DOCS_PICTURE = Path(__file__).resolve().parent.parent / "docs" / "ui.png"


def wait_for(driver: Any, check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"the page did not get there in {timeout:g}s: {driver.current_url}")
        time.sleep(0.05)


def cells(driver: Any, column: str) -> list[str]:
    """The text of one column of the entries table (``name``, ``version``, ``path``)."""
    from selenium.webdriver.common.by import By

    return [e.text for e in driver.find_elements(By.CSS_SELECTOR, f"#entries td.{column}")]


def no_alert(driver: Any) -> bool:
    from selenium.common.exceptions import NoAlertPresentException

    try:
        _ = driver.switch_to.alert
    except NoAlertPresentException:
        return True
    return False


def test_pip_and_npm_recorded_then_listed_filtered_and_shown_in_chromium(
    page: Any,  # noqa: F811
    verdaccio: tuple[str, subprocess.Popen[bytes]],  # noqa: F811
    make_proxy: MakeProxy,
    tmp_path: Path,
) -> None:
    from selenium.webdriver.common.by import By

    registry_url, _ = verdaccio
    token = npm_user(registry_url)
    for version in ("1.0.0", "1.1.0"):
        npm_publish(registry_url, tmp_path / "pub", token, "cool-base", version)
    files = publish(tmp_path / "upstream", *DEMO)
    with pypiserver(files) as index_url:
        proxy = make_proxy(
            proxy_def(key="local", format="pypi", url=index_url),
            proxy_def(key="npm", format="npm", url=registry_url),
            cache=tmp_path / "cache",
        )
        pip = pip_install(tmp_path / "t", "upstream-demo-a", env=pip_env(proxy.url("local") + "simple/"))
        assert pip.returncode == 0, pip.stderr
        assert installed_version(proxy.url("npm"), tmp_path / "js", "^1.0.0") == "1.1.0"

        page.get(proxy.base_url + "/-/ui/")
        keys = [e.text for e in page.find_elements(By.CSS_SELECTOR, "#proxies tbody tr td:first-child")]
        assert keys == ["local", "npm"]
        rate = page.find_element(By.CSS_SELECTOR, 'tr[data-key="local"] [data-counter="miss"]').text
        assert int(rate) >= 3  # two project pages and two wheels went upstream at least

        page.get(proxy.base_url + "/-/ui/local/")
        listed = set(zip(cells(page, "name"), cells(page, "version"), strict=True))
        assert {("upstream-demo-a", "1.0"), ("upstream-demo-b", "1.0")} <= listed, listed
        screenshot(page, tmp_path / "ui.png")
        if os.environ.get("UPSTREAM_SCREENSHOTS") == "1":
            screenshot(page, DOCS_PICTURE)

        box = page.find_element(By.ID, "q")
        box.send_keys("demo-b")  # the script submits the filter after a pause
        wait_for(page, lambda: "q=demo-b" in page.current_url and bool(cells(page, "name")))
        assert set(cells(page, "name")) == {"upstream-demo-b"}

        wheel = next(
            e for e in page.find_elements(By.CSS_SELECTOR, "#entries td.path") if e.text.endswith(".whl")
        )
        wheel.find_element(By.XPATH, "../td[1]/a").click()
        wait_for(page, lambda: bool(page.find_elements(By.ID, "field-sha256")))
        digest = page.find_element(By.ID, "field-sha256").text
        built = next(files.glob("upstream_demo_b-1.0-*.whl"))
        assert digest == hashlib.sha256(built.read_bytes()).hexdigest()
        assert page.find_element(By.ID, "title").text.startswith("upstream-demo-b")

        page.get(proxy.base_url + "/-/ui/npm/?kind=artifact")
        assert sorted(zip(cells(page, "name"), cells(page, "version"), strict=True)) == [
            ("cool-base", "1.1.0")
        ]


def test_hostile_names_sort_and_pages_in_chromium_through_a_token_protected_serve(
    page: Any,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from selenium.webdriver.common.by import By

    cache = Cache(tmp_path / "cache")
    hostile = put(cache, "gen", HOSTILE_NAME, b"h")
    put(cache, "npm", f"evil/-/evil-{HOSTILE_VERSION}.tgz", b"tgz")
    for i in range(60):
        put(cache, "gen", f"files/f{i:02d}.bin", b"x" * (100 + i))
    config = tmp_path / "pyproject.toml"
    config.write_text(
        f'[tool.pytest-upstream]\ncache = "{tmp_path / "cache"}"\n'
        '[[tool.pytest-upstream.proxy]]\nkey = "gen"\nsource = "custom"\nformat = "generic"\n'
        'url = "http://127.0.0.1:9/"\n'
        '[[tool.pytest-upstream.proxy]]\nkey = "npm"\nsource = "custom"\nformat = "npm"\n'
        'url = "http://127.0.0.1:9/"\n'
    )
    monkeypatch.setenv("UI_TOKEN", "browser-token-42")
    with serve_process(config, "--token-env", "UI_TOKEN") as base_url:
        page.get(base_url + "/-/ui/gen/")  # 401: the browser would prompt for the token as a password
        assert cells(page, "name") == []
        page.get(base_url + "/-/ui/gen/?per=25&token=browser-token-42")
        assert page.current_url == base_url + "/-/ui/gen/?per=25"  # the token left the address bar
        assert page.get_cookie("upstream_ui")["value"] != "browser-token-42"

        names = cells(page, "name")
        assert len(names) == 25 and HOSTILE_NAME in names  # "<" sorts before "f"
        assert no_alert(page) and page.execute_script("return document.querySelectorAll('img').length") == 0
        link = page.find_element(By.CSS_SELECTOR, f'a[href="/-/ui/gen/{hostile.id}"]')
        assert link.text == HOSTILE_NAME

        page.find_element(By.CSS_SELECTOR, "a[rel=next]").click()  # pages: the cookie, not the token
        wait_for(page, lambda: "page=2" in page.current_url)
        assert (
            cells(page, "name")[0] == "files/f24.bin"
            and "page 2 of 3" in page.find_element(By.ID, "summary").text
        )

        page.find_element(By.CSS_SELECTOR, 'a[data-sort="size"]').click()  # the largest first
        wait_for(page, lambda: "sort=size" in page.current_url)
        assert cells(page, "name")[:2] == ["files/f59.bin", "files/f58.bin"]
        page.find_element(By.CSS_SELECTOR, 'a[data-sort="size"]').click()  # then the smallest
        wait_for(page, lambda: "sort=size" in page.current_url and "order=desc" not in page.current_url)
        assert cells(page, "name")[0] == HOSTILE_NAME  # one byte

        page.get(base_url + "/-/ui/npm/")
        assert cells(page, "version") == [HOSTILE_VERSION]
        assert no_alert(page) and page.execute_script("return document.scripts.length") == 1  # ours only
