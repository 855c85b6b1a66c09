"""End-to-end signup and confirmation in Debian's Chromium against a live server.

The server is hypercorn on a free port of 127.0.0.1 with a fresh instance folder,
so the development mailbox catches the confirmation email and the test reads it
through the mailbox pages, as a developer would.
"""

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from playwright.async_api import (
    Locator,
    Page,
    TimeoutError as PlaywrightTimeoutError,
    async_playwright,
    expect,
)

from quart_app.config import Settings

CHROMIUM = Path("/usr/bin/chromium")
# The test may only reach 127.0.0.1. Debian's Chromium 156 still asked for
# update.googleapis.com, accounts.google.com and content-autofill.googleapis.com
# with the flags up to --disable-sync, so the resolver rules make every host name
# fail to resolve inside the browser, and no proxy from the environment is used.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
    "--no-proxy-server",
]
PROJECT_ROOT = Path(__file__).resolve().parent.parent
CONFIRM_SUBJECT = "[Quart App] Confirm Your Account"
PASSWORD = "correct horse battery staple"

# Seconds.
MIGRATION_TIMEOUT = 60
STARTUP_TIMEOUT = 30
# Longer than graceful_timeout in hypercorn.toml (15 s), so a clean shutdown can
# finish before the test kills the server.
SHUTDOWN_TIMEOUT = 20

# The email is sent by a background task after the signup response, so the mailbox
# page may need a few reloads before it lists the message.
MAILBOX_RELOADS = 20
# In milliseconds, Playwright's unit.
MAILBOX_WAIT_MS = 500

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not CHROMIUM.exists() and not os.environ.get("CI"),
        reason=f"Chromium not found at {CHROMIUM}: install Debian's chromium package",
    ),
]


@dataclass
class LiveServer:
    """A running hypercorn process and everything it has written so far."""

    base_url: str
    process: asyncio.subprocess.Process
    output: list[str] = field(default_factory=list)

    def record(self, line: str) -> None:
        self.output.append(line)
        # pytest captures stderr and shows it in the report of a failed test.
        sys.stderr.write(line)

    def log(self) -> str:
        return "".join(self.output)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _app_environment(instance_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    # No app setting from the outer environment may reach the server. A
    # MAIL_SERVER would turn off the development mailbox, and a DATABASE_URL
    # would point the test at another database.
    for name in Settings.model_fields:
        env.pop(name, None)
    env["APP_ENV"] = "development"
    env["INSTANCE_PATH"] = str(instance_path)
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")])
    )
    return env


async def _read_until_running(server: LiveServer, marker: str) -> None:
    stream = server.process.stdout
    assert stream is not None
    while True:
        line = (await stream.readline()).decode(errors="replace")
        if not line:
            await server.process.wait()
            pytest.fail(
                f"hypercorn exited with code {server.process.returncode} before "
                f"serving:\n{server.log()}"
            )
        server.record(line)
        if marker in line:
            return


async def _drain(server: LiveServer) -> None:
    stream = server.process.stdout
    assert stream is not None
    while line := await stream.readline():
        server.record(line.decode(errors="replace"))


async def _stop(process: asyncio.subprocess.Process) -> bool:
    """Stop hypercorn with SIGTERM, or kill its process group after the timeout.

    Returns whether it had to be killed.
    """
    if process.returncode is None:
        process.terminate()
    try:
        async with asyncio.timeout(SHUTDOWN_TIMEOUT):
            await process.wait()
    except TimeoutError:
        # Killing only the parent would leave its worker running and holding the
        # output pipe open.
        os.killpg(process.pid, signal.SIGKILL)
        await process.wait()
        return True
    return False


@pytest.fixture
def instance_path(tmp_path: Path) -> Path:
    """Create a fresh instance folder and apply the migrations to its database."""
    path = tmp_path / "instance"
    path.mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "alembic", "upgrade", "head"],
        cwd=PROJECT_ROOT,
        env=_app_environment(path),
        capture_output=True,
        text=True,
        timeout=MIGRATION_TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, (
        f"alembic upgrade head failed with code {result.returncode}:\n"
        f"{result.stdout}{result.stderr}"
    )
    return path


@pytest.fixture
async def live_server(instance_path: Path) -> AsyncIterator[LiveServer]:
    """Start hypercorn on a free port and stop it with SIGTERM after the test."""
    port = _free_port()
    base_url = f"http://127.0.0.1:{port}"
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "hypercorn",
        "--config",
        "hypercorn.toml",
        "--bind",
        f"127.0.0.1:{port}",
        "quart_app:create_app()",
        cwd=PROJECT_ROOT,
        env=_app_environment(instance_path) | {"APP_BASE_URL": base_url},
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        # A group of its own lets a forced stop reach hypercorn's worker process too.
        process_group=0,
    )
    server = LiveServer(base_url=base_url, process=process)
    drain: asyncio.Task[None] | None = None
    try:
        try:
            async with asyncio.timeout(STARTUP_TIMEOUT):
                await _read_until_running(server, f"Running on {base_url}")
        except TimeoutError:
            pytest.fail(
                f"hypercorn did not report 'Running on {base_url}' within "
                f"{STARTUP_TIMEOUT} s:\n{server.log()}"
            )
        # Reading the rest of the output keeps the pipe from filling up, which
        # would block the server on its next log line.
        drain = asyncio.create_task(_drain(server))
        yield server
    finally:
        killed = await _stop(process)
        if drain is not None:
            await drain
        else:
            await _drain(server)

    assert not killed, (
        f"hypercorn did not exit within {SHUTDOWN_TIMEOUT} s of SIGTERM and was "
        f"killed:\n{server.log()}"
    )
    assert process.returncode == 0, (
        f"hypercorn exited with code {process.returncode} after SIGTERM:\n"
        f"{server.log()}"
    )


@pytest.fixture
def chromium_executable() -> Path:
    """Return the Chromium path, or fail when it is missing and CI is set."""
    if not CHROMIUM.exists():
        # Only reached with CI set, because the module is skipped otherwise.
        pytest.fail(
            f"Chromium not found at {CHROMIUM}, and CI is set: the browser test "
            "must run in CI, so install Debian's chromium package on the runner"
        )
    return CHROMIUM


@pytest.fixture
async def page(chromium_executable: Path) -> AsyncIterator[Page]:
    """Open a tab in a fresh headless Chromium profile."""
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=chromium_executable, headless=True, args=CHROMIUM_ARGS
        )
        try:
            context = await browser.new_context()
            yield await context.new_page()
            await context.close()
        finally:
            await browser.close()


@pytest.fixture
def screenshot_dir(tmp_path: Path) -> Path:
    """Create and return BROWSER_SCREENSHOT_DIR, or return tmp_path when unset."""
    configured = os.environ.get("BROWSER_SCREENSHOT_DIR")
    if not configured:
        return tmp_path
    path = Path(configured)
    path.mkdir(parents=True, exist_ok=True)
    return path


async def _sign_up(page: Page, base_url: str, *, email: str, username: str) -> None:
    await page.goto(f"{base_url}/auth/register")
    await page.locator("#email").fill(email)
    await page.locator("#username").fill(username)
    await page.locator("#password").fill(PASSWORD)
    await page.locator("#password2").fill(PASSWORD)
    await page.get_by_role("button", name="Sign up", exact=True).click()

    await expect(page).to_have_url(f"{base_url}/auth/unconfirmed")
    await expect(
        page.get_by_text("You have not confirmed your account yet.")
    ).to_be_visible()
    await expect(
        page.get_by_text("A confirmation email has been sent to your address.")
    ).to_be_visible()


async def _open_confirmation_email(page: Page, base_url: str, email: str) -> None:
    """Open the mailbox and then the confirmation email sent to `email`."""
    await page.goto(f"{base_url}/dev/mailbox")
    row = page.get_by_role("row").filter(has_text=email)
    link = row.get_by_role("link", name=CONFIRM_SUBJECT, exact=True)
    for _ in range(MAILBOX_RELOADS):
        try:
            await link.wait_for(state="visible", timeout=MAILBOX_WAIT_MS)
            break
        except PlaywrightTimeoutError:
            await page.reload()
    await expect(link).to_be_visible(timeout=MAILBOX_WAIT_MS)

    await link.click()
    message_url = re.compile(
        re.escape(f"{base_url}/dev/mailbox/") + r"[0-9]{19,20}-[0-9a-f]{32}"
    )
    await expect(page).to_have_url(message_url)
    heading = page.get_by_role("heading", name=CONFIRM_SUBJECT, exact=True)
    await expect(heading).to_be_visible()


async def _href(link: Locator) -> str:
    href = await link.get_attribute("href")
    assert href is not None, "the link has no href attribute"
    return href


async def test_signup_confirm_in_browser(
    page: Page, live_server: LiveServer, screenshot_dir: Path
) -> None:
    base_url = live_server.base_url
    await _sign_up(page, base_url, email="ada@example.com", username="ada")
    await _open_confirmation_email(page, base_url, "ada@example.com")

    text_link = page.locator("pre.text-part").get_by_role("link")
    await expect(text_link).to_have_count(1)
    confirm_url = await _href(text_link)
    assert confirm_url.startswith(f"{base_url}/auth/confirm/")
    await expect(text_link).to_have_text(confirm_url)

    html_part = page.frame_locator("iframe.html-part")
    await expect(html_part.get_by_text("Dear ada,")).to_be_visible()
    html_links = html_part.get_by_role("link")
    await expect(html_links).to_have_count(2)
    html_hrefs = [await _href(link) for link in await html_links.all()]
    assert html_hrefs == [confirm_url, confirm_url]

    # Headless Chromium 156 left the sandboxed frame blank in a full-page
    # screenshot while it was below the fold, so it is scrolled into view first.
    await page.locator("iframe.html-part").scroll_into_view_if_needed()
    await page.screenshot(path=screenshot_dir / "mailbox-message.png", full_page=True)

    await text_link.click()
    await expect(page).to_have_url(confirm_url)
    heading = page.get_by_role("heading", name="Account confirmed", exact=True)
    await expect(heading).to_be_visible()
    await expect(
        page.get_by_text("Thanks, ada: you have confirmed your account.")
    ).to_be_visible()
    await page.screenshot(path=screenshot_dir / "signup-confirmed.png", full_page=True)

    await page.goto(f"{base_url}/")
    await expect(page).to_have_url(f"{base_url}/")
    await expect(
        page.get_by_role("heading", name="Hello, ada!", exact=True)
    ).to_be_visible()
    await expect(page.get_by_text("Your account is confirmed.")).to_be_visible()


async def test_html_part_link_confirms(page: Page, live_server: LiveServer) -> None:
    base_url = live_server.base_url
    await _sign_up(page, base_url, email="grace@example.com", username="grace")
    await _open_confirmation_email(page, base_url, "grace@example.com")

    # The sandbox lets the frame navigate the whole tab only after a user gesture,
    # and Playwright's click sends real input events, which count as one.
    html_part = page.frame_locator("iframe.html-part")
    await html_part.get_by_role("link", name="click here", exact=True).click()

    await expect(page).to_have_url(
        re.compile(re.escape(f"{base_url}/auth/confirm/") + r"\S+")
    )
    heading = page.get_by_role("heading", name="Account confirmed", exact=True)
    await expect(heading).to_be_visible()
    await expect(
        page.get_by_text("Thanks, grace: you have confirmed your account.")
    ).to_be_visible()
