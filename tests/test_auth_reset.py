import re
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from quart import Quart
from quart.testing import QuartClient

from quart_app.tokens import Purpose, generate_token
from tests.conftest import (
    BASE_URL,
    PASSWORD,
    Relay,
    csrf_token,
    fetch_outbox,
    fetch_users,
    link_to,
    login,
    make_app,
    next_message_about,
    page_text,
    parts_of,
    register,
    serving,
    sign_up,
)

NEW_PASSWORD = "a brand new passphrase"
RESET_SUBJECT = "[Quart App] Reset Your Password"


async def _request_reset(
    client: QuartClient,
    email: str = "alice@example.com",
    headers: dict[str, str] | None = None,
) -> Any:
    token = await csrf_token(client, "/auth/reset")
    return await client.post(
        "/auth/reset", form={"csrf_token": token, "email": email}, headers=headers
    )


async def _reset_path(relay: Relay) -> str:
    """Wait for the next reset email and return its link's path."""
    message = await next_message_about(relay, "Reset Your Password")
    return urlsplit(link_to(message, "/auth/reset/")).path


async def _post_new_password(
    client: QuartClient,
    path: str,
    password: str = NEW_PASSWORD,
    password2: str | None = None,
) -> Any:
    # The CSRF token belongs to the session, so a used or expired link, whose
    # page has no form, still gets a valid one.
    token = await csrf_token(client, "/auth/reset")
    return await client.post(
        path,
        form={
            "csrf_token": token,
            "password": password,
            "password2": password if password2 is None else password2,
        },
    )


async def _token(app: Quart, purpose: Purpose, payload: dict, **options: int) -> str:
    async with app.app_context():
        return generate_token(purpose, payload, **options)


async def _reset_payload(app: Quart) -> dict[str, Any]:
    [user] = await fetch_users(app)
    return {
        "reset": user.id,
        "email": user.email,
        "password": user.password_fingerprint,
    }


async def _logs_in(app: Quart, password: str) -> bool:
    """Log in as alice with `password` in a fresh client."""
    async with serving(app) as client:
        response = await login(client, password=password)
    return response.status_code == 302


async def _flashes_after(client: QuartClient, response: Any) -> list[str]:
    """Follow a redirect and return the flashed messages on the page it leads to."""
    page = await page_text(await client.get(response.headers["Location"]))
    return re.findall(r'<div class="flash[^"]*" role="status">([^<]*)</div>', page)


def _reset_emails(relay: Relay) -> list[Any]:
    return [
        message for message in relay.messages if message["Subject"] == RESET_SUBJECT
    ]


async def test_reset_flow_end_to_end(app: Quart, relay: Relay) -> None:
    async with serving(app) as client:
        await register(client)
        await client.get("/auth/logout")

        form = await client.get("/auth/reset")
        assert form.status_code == 200
        assert 'name="email"' in await page_text(form)
        response = await _request_reset(client, email="Alice@Example.com")
        assert response.status_code == 302
        assert response.headers["Location"] == "/auth/login"

        message = await next_message_about(relay, "Reset Your Password")
        assert message["To"] == "alice@example.com"
        assert message.get_content_type() == "multipart/alternative"
        text, html = parts_of(message)
        link = link_to(message, "/auth/reset/")
        assert link.startswith(f"{BASE_URL}/auth/reset/")
        assert link in text
        assert f'href="{link}"' in html

        path = urlsplit(link).path
        page = await client.get(path)
        assert page.status_code == 200
        page_html = await page_text(page)
        assert 'name="csrf_token"' in page_html
        assert 'name="password"' in page_html
        assert 'name="password2"' in page_html

        reset = await _post_new_password(client, path)
        assert reset.status_code == 302
        assert reset.headers["Location"] == "/auth/login"
        login_page = await client.get("/auth/login")
        assert "Your password has been reset." in await page_text(login_page)

        old = await login(client)
        assert old.status_code == 200
        assert "Invalid email or password." in await page_text(old)
        new = await login(client, password=NEW_PASSWORD)
        assert new.status_code == 302
        assert new.headers["Location"] == "/"
        notice = await next_message_about(relay, "Your Password Was Changed")
        assert notice["To"] == "alice@example.com"

    [user] = await fetch_users(app)
    # The link proved control of the address, so the account is confirmed.
    assert user.confirmed


async def test_reset_link_works_once(app: Quart, relay: Relay) -> None:
    async with serving(app) as client:
        await register(client)
        await _request_reset(client)
        path = await _reset_path(relay)
        assert (await _post_new_password(client, path)).status_code == 302

        again = await client.get(path)
        assert again.status_code == 400
        assert "This link is not valid" in await page_text(again)
        second = await _post_new_password(client, path, password="yet another one")
        assert second.status_code == 400

        still_new = await login(client, password=NEW_PASSWORD)
        assert still_new.status_code == 302


async def test_reset_expired_token(app: Quart, relay: Relay) -> None:
    async with serving(app) as client:
        await register(client)
        two_hours_ago = int(time.time()) - 7200
        token = await _token(
            app,
            Purpose.RESET_PASSWORD,
            await _reset_payload(app),
            issued_at=two_hours_ago,
        )
        page = await client.get(f"/auth/reset/{token}")
        assert page.status_code == 400
        assert "This link has expired" in await page_text(page)
        posted = await _post_new_password(client, f"/auth/reset/{token}")
        assert posted.status_code == 400
        assert "This link has expired" in await page_text(posted)

    assert await _logs_in(app, PASSWORD)


async def test_reset_tampered_token(app: Quart, relay: Relay) -> None:
    async with serving(app) as client:
        await register(client)
        await _request_reset(client)
        token = (await _reset_path(relay)).rsplit("/", 1)[1]
        tampered = token[:-2] + ("AA" if not token.endswith("AA") else "BB")
        for bad in (tampered, "garbage", "a.b.c", token + "x", "%00"):
            response = await client.get(f"/auth/reset/{bad}")
            assert response.status_code == 400, bad
            assert "This link is not valid" in await page_text(response), bad


@pytest.mark.parametrize("purpose", [Purpose.CONFIRM, Purpose.CHANGE_EMAIL])
async def test_reset_other_purpose_token(
    app: Quart, relay: Relay, purpose: Purpose
) -> None:
    async with serving(app) as client:
        await register(client)
        token = await _token(app, purpose, await _reset_payload(app))
        page = await client.get(f"/auth/reset/{token}")
        assert page.status_code == 400
        assert "This link is not valid" in await page_text(page)


@pytest.mark.parametrize(
    "change",
    [
        {"reset": 999},
        {"reset": "1"},
        {"email": "someone-else@example.com"},
        {"password": "0" * 16},
        {"password": None},
    ],
)
async def test_reset_token_wrong_account(
    app: Quart, relay: Relay, change: dict[str, Any]
) -> None:
    async with serving(app) as client:
        await register(client)
        payload = {**await _reset_payload(app), **change}
        token = await _token(app, Purpose.RESET_PASSWORD, payload)
        page = await client.get(f"/auth/reset/{token}")
        assert page.status_code == 400


async def test_reset_unknown_address_same_response(app: Quart, relay: Relay) -> None:
    async with serving(app) as client:
        await register(client)
        await client.get("/auth/logout")
        known = await _request_reset(client, email="alice@example.com")
        known_flashes = await _flashes_after(client, known)
        unknown = await _request_reset(client, email="nobody@example.com")
        unknown_flashes = await _flashes_after(client, unknown)
        await next_message_about(relay, "Reset Your Password")

    assert unknown.status_code == known.status_code
    assert unknown.headers["Location"] == known.headers["Location"]
    assert len(known_flashes) == 1
    assert unknown_flashes == known_flashes
    # Leaving `serving` waited for every send, so a second email would be here.
    assert [message["To"] for message in _reset_emails(relay)] == ["alice@example.com"]
    reset_rows = [row for row in await fetch_outbox(app) if "Reset" in row.subject]
    assert len(reset_rows) == 1


async def test_reset_unknown_address_sends_nothing(app: Quart, relay: Relay) -> None:
    async with serving(app) as client:
        response = await _request_reset(client, email="nobody@example.com")
        assert response.status_code == 302
    assert relay.messages == []
    assert await fetch_outbox(app) == []


async def test_reset_rate_limited_per_account(
    database_url: str, relay: Relay, tmp_path: Path
) -> None:
    app = make_app(database_url, relay.port, tmp_path, PASSWORD_RESET_INTERVAL=60)
    async with serving(app) as client:
        await register(client)
        await client.get("/auth/logout")
        first = await _request_reset(client)
        first_flashes = await _flashes_after(client, first)
        second = await _request_reset(client)
        second_flashes = await _flashes_after(client, second)
        third = await _request_reset(client, email="ALICE@example.com")
        assert first.status_code == 302
        # A limited request gets the same response, so it reveals nothing.
        assert second.status_code == 302
        assert second_flashes == first_flashes
        assert third.status_code == 302
    assert len(_reset_emails(relay)) == 1


async def test_reset_request_missing_csrf(app: Quart, relay: Relay) -> None:
    async with serving(app) as client:
        await register(client)
        response = await client.post("/auth/reset", form={"email": "alice@example.com"})
        assert response.status_code == 400
        assert "security token" in await page_text(response)
        forged = await client.post(
            "/auth/reset", form={"csrf_token": "forged", "email": "alice@example.com"}
        )
        assert forged.status_code == 400
    assert _reset_emails(relay) == []


async def test_reset_password_missing_csrf(app: Quart, relay: Relay) -> None:
    async with serving(app) as client:
        await register(client)
        await _request_reset(client)
        path = await _reset_path(relay)
        response = await client.post(
            path, form={"password": NEW_PASSWORD, "password2": NEW_PASSWORD}
        )
        assert response.status_code == 400
        assert "security token" in await page_text(response)
        # The link was not used up by the rejected form.
        assert (await client.get(path)).status_code == 200
    assert await _logs_in(app, PASSWORD)


async def test_reset_mismatched_passwords(app: Quart, relay: Relay) -> None:
    async with serving(app) as client:
        await register(client)
        await _request_reset(client)
        path = await _reset_path(relay)
        response = await _post_new_password(client, path, password2="something else")
        assert response.status_code == 200
        assert "The passwords do not match." in await page_text(response)
    assert await _logs_in(app, PASSWORD)


@pytest.mark.parametrize("password", ["short", "x" * 129, ""])
async def test_reset_password_length(app: Quart, relay: Relay, password: str) -> None:
    async with serving(app) as client:
        await register(client)
        await _request_reset(client)
        path = await _reset_path(relay)
        response = await _post_new_password(client, path, password=password)
        assert response.status_code == 200
        assert 'class="error"' in await page_text(response)
    assert await _logs_in(app, PASSWORD)


async def test_reset_ends_other_logins(app: Quart, relay: Relay) -> None:
    async with app.test_app() as test_app:
        client = test_app.test_client()
        other = test_app.test_client()
        await sign_up(client, relay)
        assert (await login(other)).status_code == 302
        assert "Hello, alice!" in await page_text(await other.get("/"))

        await _request_reset(client)
        path = await _reset_path(relay)
        assert (await _post_new_password(client, path)).status_code == 302

        assert "Hello, stranger!" in await page_text(await other.get("/"))
        assert "Hello, stranger!" in await page_text(await client.get("/"))


async def test_reset_request_allowed_logged_in(app: Quart, relay: Relay) -> None:
    # A browser can stay logged in long after its user forgot the password, and
    # changing the password otherwise needs the current one, so a logged-in user
    # may ask for a reset link too.
    async with serving(app) as client:
        await sign_up(client, relay)
        form = await client.get("/auth/reset")
        assert form.status_code == 200
        response = await _request_reset(client)
        assert response.status_code == 302
        path = await _reset_path(relay)
        assert (await _post_new_password(client, path)).status_code == 302
    assert await _logs_in(app, NEW_PASSWORD)


async def test_reset_forged_host_not_in_link(app: Quart, relay: Relay) -> None:
    async with serving(app) as client:
        await register(client)
        response = await _request_reset(
            client, headers={"Host": "evil.example", "X-Forwarded-Host": "evil.example"}
        )
        assert response.status_code == 302
        message = await next_message_about(relay, "Reset Your Password")
    text, html = parts_of(message)
    assert "evil.example" not in text
    assert "evil.example" not in html
    assert link_to(message, "/auth/reset/").startswith(f"{BASE_URL}/auth/reset/")


@pytest.mark.parametrize(
    "email",
    [
        "alice@example.com\r\nBcc: victim@example.com",
        "alice@example.com\nBcc: victim@example.com",
        "alice@example.com\x00",
        "alice@exa\rmple.com",
        "a" * 250 + "@example.com",
        "",
    ],
)
async def test_reset_request_hostile_email(
    app: Quart, relay: Relay, email: str
) -> None:
    async with serving(app) as client:
        await register(client)
        response = await _request_reset(client, email=email)
        assert response.status_code == 200
        assert 'class="error"' in await page_text(response)
    assert _reset_emails(relay) == []
    for envelope in relay.envelopes:
        assert "victim@example.com" not in envelope.rcpt_tos


@pytest.mark.parametrize(
    "email",
    [
        "victim@example.com, alice@example.com",
        "<script>alert(1)</script>@example.com",
        "alice@example.com' OR '1'='1",
    ],
)
async def test_reset_request_odd_email_no_match(
    app: Quart, relay: Relay, email: str
) -> None:
    # These pass the form but name no account, so they get the usual response
    # and send nothing.
    async with serving(app) as client:
        await register(client)
        response = await _request_reset(client, email=email)
        assert response.status_code == 302
    assert _reset_emails(relay) == []
    for envelope in relay.envelopes:
        assert "victim@example.com" not in envelope.rcpt_tos


async def test_reset_link_void_after_password_change(app: Quart, relay: Relay) -> None:
    async with serving(app) as client:
        await sign_up(client, relay)
        await _request_reset(client)
        path = await _reset_path(relay)

        token = await csrf_token(client, "/auth/change-password")
        changed = await client.post(
            "/auth/change-password",
            form={
                "csrf_token": token,
                "old_password": PASSWORD,
                "password": NEW_PASSWORD,
                "password2": NEW_PASSWORD,
            },
        )
        assert changed.status_code == 302
        page = await client.get(path)
        assert page.status_code == 400


async def test_login_page_links_to_reset(client: QuartClient) -> None:
    page = await page_text(await client.get("/auth/login"))
    assert 'href="/auth/reset"' in page
    assert "Forgot your password?" in page
