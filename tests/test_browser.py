"""End-to-end signup and confirmation in Debian's Chromium against a live server.

The server is hypercorn on a free port of 127.0.0.1 with a fresh instance folder,
so the development mailbox catches the confirmation email and the test reads it
through the mailbox pages, as a developer would.
"""

import os
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from playwright.async_api import (
    Locator,
    Page,
    TimeoutError as PlaywrightTimeoutError,
    async_playwright,
    expect,
)

from tests.live import LiveServer, live_server, migrated_instance

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
CONFIRM_SUBJECT = "[Quart App] Confirm Your Account"
PASSWORD = "correct horse battery staple"

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


@pytest.fixture(name="instance_path")
def _instance_path(tmp_path: Path) -> Path:
    return migrated_instance(tmp_path)


@pytest.fixture(name="live_server")
async def _live_server(instance_path: Path) -> AsyncIterator[LiveServer]:
    async with live_server(instance_path) as server:
        yield server


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
        page.get_by_text("A confirmation email is on its way to your address.")
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
