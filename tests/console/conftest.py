"""A real Chromium (Debian's package, which scripts/test installs) driven by Playwright,
pointed at a console that convsvc serves; every page's console errors are collected, and a
screenshot of each page lands in the test artefacts."""

from __future__ import annotations

import os
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, Page, async_playwright

from tests.cluster.conftest import cluster  # noqa: F401 - the three-node test uses it

ARTIFACTS = Path(os.environ.get("CONVSVC_TEST_ARTIFACTS", "test-artifacts")) / "console"


def chromium_binary() -> str:
    """The browser binary in the package's lib folder (the /usr/bin wrapper script does not
    start under Playwright)."""
    listed = subprocess.run(
        ["dpkg", "-L", "chromium"], capture_output=True, text=True, check=True
    ).stdout
    found = [line for line in listed.splitlines() if line.endswith("/lib/chromium/chromium")]
    assert found, "Debian's chromium package has no lib/chromium/chromium"
    return found[0]


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=chromium_binary(),
            headless=True,
            # As root there is no sandbox to drop into.
            args=["--no-sandbox"] if os.geteuid() == 0 else [],
        )
        yield launched
        await launched.close()


class Console:
    """A page of the console, with what went wrong in it."""

    def __init__(self, page: Page, base_url: str) -> None:
        self.page = page
        self.base_url = base_url
        self.errors: list[str] = []
        page.on("console", self._console)
        page.on("pageerror", lambda error: self.errors.append(f"page error: {error}"))

    def _console(self, message: Any) -> None:
        if message.type == "error":
            self.errors.append(f"console error: {message.text}")

    async def log_in(self, token: str) -> None:
        await self.page.goto(f"{self.base_url}/console/")
        await self.page.fill("#token", token)
        await self.page.click("button[type=submit]")

    async def screenshot(self, name: str) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        await self.page.screenshot(path=str(path), full_page=True)
        return path


@pytest.fixture
async def open_console(browser: Browser) -> AsyncIterator[Any]:
    """Opens console pages; at the end, none may have logged an error."""
    opened: list[Console] = []

    async def open_page(base_url: str) -> Console:
        context = await browser.new_context()
        console = Console(await context.new_page(), base_url)
        opened.append(console)
        return console

    yield open_page
    errors = [e for c in opened for e in c.errors if not _expected(e)]
    for console in opened:
        await console.page.context.close()
    assert errors == [], errors


def _expected(error: str) -> bool:
    """Errors a test provokes on purpose: a refused action's HTTP status."""
    return "the server responded with a status of 403" in error
