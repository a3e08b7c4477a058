"""Headless Chromium (Debian's `chromium`, driven by Playwright for Python) against real nodes.

The system browser only: Playwright's own browser download never runs (`.ci/run` installs Debian's
package). Without /usr/bin/chromium the tests skip and say why.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from typing import Any

import pytest

CHROMIUM = os.environ.get("IMNODE_CHROMIUM", "/usr/bin/chromium")
# What Chromium needs on this closed network: no sandbox as root, no GPU, and none of its background
# connections to Google (refused here, and slow to give up on). Playwright adds a fresh --user-data-dir.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 20_000


def chromium_or_skip() -> str:
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)) and not shutil.which("chromium"):
        pytest.skip(
            f"no Chromium at {CHROMIUM}: `apt-get install -y chromium` (.ci/run does) for browser tests"
        )
    return CHROMIUM if os.path.isfile(CHROMIUM) else str(shutil.which("chromium"))


def wait_for_number(page: Any, expression: str, above: float, timeout_s: float = TIMEOUT_MS / 1000) -> None:
    """Poll a number the page computes until it exceeds `above` (bounded). Not `wait_for_function`:
    Playwright compiles its predicate with `new Function`, which the console's CSP (no 'unsafe-eval')
    refuses; `evaluate` runs through the DevTools protocol, outside the page's CSP."""
    deadline = time.monotonic() + timeout_s
    value = page.evaluate(expression)
    while not value > above:
        assert time.monotonic() < deadline, f"{expression} = {value}, not above {above} within {timeout_s} s"
        page.wait_for_timeout(50)  # the charts redraw once a second
        value = page.evaluate(expression)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    executable = chromium_or_skip()
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the test extras")
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    # What the node's Content-Security-Policy blocked (a script, a style, a WebSocket port it does not list)
    # shows as a console error only: the page would just half work.
    page.on(
        "console",
        lambda message: (
            errors.append(message.text)
            if message.type == "error" and "Content Security Policy" in message.text
            else None
        ),
    )
    try:
        yield page
    finally:
        context.close()
    assert not errors, f"uncaught errors or CSP violations in the page: {errors}"
