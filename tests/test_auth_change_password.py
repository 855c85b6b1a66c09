from pathlib import Path
from typing import Any

import pytest
from quart import Quart
from quart.testing import QuartClient

from tests.conftest import (
    BASE_URL,
    PASSWORD,
    Relay,
    csrf_token,
    fetch_users,
    login,
    make_app,
    next_message_about,
    page_text,
    parts_of,
    serving,
    sign_up,
)

NEW_PASSWORD = "a brand new passphrase"


async def _change_password(
    client: QuartClient,
    *,
    old_password: str = PASSWORD,
    password: str = NEW_PASSWORD,
    password2: str | None = None,
) -> Any:
    token = await csrf_token(client, "/auth/change-password")
    return await client.post(
        "/auth/change-password",
        form={
            "csrf_token": token,
            "old_password": old_password,
            "password": password,
            "password2": password if password2 is None else password2,
        },
    )


async def _logs_in(app: Quart, password: str) -> bool:
    """Log in as alice with `password` in a fresh client."""
    async with serving(app) as client:
        response = await login(client, password=password)
    return response.status_code == 302


async def test_change_password_keeps_this_login(app: Quart, relay: Relay) -> None:
    async with app.test_app() as test_app:
        client = test_app.test_client()
        other = test_app.test_client()
        await sign_up(client, relay)
        assert (await login(other)).status_code == 302
        assert "Hello, alice!" in await page_text(await other.get("/"))

        form = await client.get("/auth/change-password")
        assert form.status_code == 200
        response = await _change_password(client)
        assert response.status_code == 302
        assert response.headers["Location"] == "/"

        home = await page_text(await client.get("/"))
        assert "Your password has been changed." in home
        assert "Hello, alice!" in home
        assert "Hello, stranger!" in await page_text(await other.get("/"))

    assert not await _logs_in(app, PASSWORD)
    assert await _logs_in(app, NEW_PASSWORD)


async def test_change_password_notice_sent(app: Quart, relay: Relay) -> None:
    async with serving(app) as client:
        await sign_up(client, relay)
        assert (await _change_password(client)).status_code == 302
        notice = await next_message_about(relay, "Your Password Was Changed")
    text, html = parts_of(notice)
    assert notice["To"] == "alice@example.com"
    assert f"{BASE_URL}/auth/reset" in text
    assert f'href="{BASE_URL}/auth/reset"' in html
    assert NEW_PASSWORD not in text
    assert NEW_PASSWORD not in html


async def test_change_password_wrong_old_password(app: Quart, relay: Relay) -> None:
    async with serving(app) as client:
        await sign_up(client, relay)
        [before] = await fetch_users(app)
        response = await _change_password(client, old_password="not my password")
        assert response.status_code == 200
        assert "The current password is incorrect." in await page_text(response)
        assert "Hello, alice!" in await page_text(await client.get("/"))

    [after] = await fetch_users(app)
    assert after.password_hash == before.password_hash


async def test_change_password_mismatched(app: Quart, relay: Relay) -> None:
    async with serving(app) as client:
        await sign_up(client, relay)
        response = await _change_password(client, password2="something else")
        assert response.status_code == 200
        assert "The passwords do not match." in await page_text(response)
    assert await _logs_in(app, PASSWORD)


@pytest.mark.parametrize("password", ["short", "x" * 129])
async def test_change_password_length(app: Quart, relay: Relay, password: str) -> None:
    async with serving(app) as client:
        await sign_up(client, relay)
        response = await _change_password(client, password=password)
        assert response.status_code == 200
        assert "Use 8 to 128 characters." in await page_text(response)
    assert await _logs_in(app, PASSWORD)


@pytest.mark.parametrize("form", [{}, {"old_password": "x" * 10_000}])
async def test_change_password_malformed_form(
    app: Quart, relay: Relay, form: dict[str, str]
) -> None:
    async with serving(app) as client:
        await sign_up(client, relay)
        token = await csrf_token(client, "/auth/change-password")
        response = await client.post(
            "/auth/change-password", form={"csrf_token": token, **form}
        )
        assert response.status_code == 200
        assert 'class="error"' in await page_text(response)
    assert await _logs_in(app, PASSWORD)


@pytest.mark.parametrize("token", [None, "forged"])
async def test_change_password_missing_csrf(
    app: Quart, relay: Relay, token: str | None
) -> None:
    form = {
        "old_password": PASSWORD,
        "password": NEW_PASSWORD,
        "password2": NEW_PASSWORD,
    }
    if token is not None:
        form["csrf_token"] = token
    async with serving(app) as client:
        await sign_up(client, relay)
        response = await client.post("/auth/change-password", form=form)
        assert response.status_code == 400
        assert "security token" in await page_text(response)
    assert await _logs_in(app, PASSWORD)


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_change_password_needs_login(client: QuartClient, method: str) -> None:
    response = await client.open("/auth/change-password", method=method)
    assert response.status_code == 302
    assert response.headers["Location"] == "/auth/login?next=/auth/change-password"


async def test_nav_links_account_pages(app: Quart, relay: Relay) -> None:
    async with serving(app) as client:
        stranger = await page_text(await client.get("/"))
        await sign_up(client, relay)
        member = await page_text(await client.get("/"))
    assert 'href="/auth/change-password"' in member
    assert 'href="/auth/change-email"' in member
    assert 'href="/auth/change-password"' not in stranger


async def test_change_password_wrong_counts_for_lockout(
    database_url: str, relay: Relay, tmp_path: Path
) -> None:
    # Someone at a browser left logged in must not get unlimited guesses.
    app = make_app(database_url, relay.port, tmp_path, LOGIN_MAX_FAILURES=2)
    async with serving(app) as client:
        await sign_up(client, relay)
        [before] = await fetch_users(app)
        for _ in range(2):
            wrong = await _change_password(client, old_password="not my password")
            assert wrong.status_code == 200
        locked = await _change_password(client)
        page = await page_text(locked)
        login_page = await login(client)

    assert locked.status_code == 429
    assert 0 < int(locked.headers["Retry-After"]) <= 900
    assert "Too many wrong passwords for this account" in page
    assert login_page.status_code == 429
    [after] = await fetch_users(app)
    assert after.password_hash == before.password_hash
