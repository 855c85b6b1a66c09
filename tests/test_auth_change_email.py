import asyncio
import time
from email.message import EmailMessage
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from quart import Quart
from quart.testing import QuartClient

from quart_app.tokens import Purpose, generate_token, load_token
from tests.conftest import (
    BASE_URL,
    PASSWORD,
    Relay,
    csrf_token,
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

NEW_EMAIL = "alice.new@example.com"
CHANGE_SUBJECT = "[Quart App] Confirm Your Email Address"


async def _request_change(
    client: QuartClient,
    email: str = NEW_EMAIL,
    password: str = PASSWORD,
    headers: dict[str, str] | None = None,
) -> Any:
    token = await csrf_token(client, "/auth/change-email")
    return await client.post(
        "/auth/change-email",
        form={"csrf_token": token, "email": email, "password": password},
        headers=headers,
    )


async def _change_message(relay: Relay) -> EmailMessage:
    return await next_message_about(relay, "Confirm Your Email Address")


def _change_path(message: EmailMessage) -> str:
    return urlsplit(link_to(message, "/auth/change-email/")).path


def _change_emails(relay: Relay) -> list[EmailMessage]:
    return [m for m in relay.messages if m["Subject"] == CHANGE_SUBJECT]


async def _emails(app: Quart) -> list[str]:
    return [user.email for user in await fetch_users(app)]


async def test_change_email_flow_end_to_end(app: Quart, relay: Relay) -> None:
    async with serving(app) as client:
        await sign_up(client, relay)
        form = await client.get("/auth/change-email")
        assert form.status_code == 200
        assert "alice@example.com" in await page_text(form)

        response = await _request_change(client, email="Alice.New@Example.com")
        assert response.status_code == 302
        assert response.headers["Location"] == "/"
        assert f"has been sent to {NEW_EMAIL}" in await page_text(await client.get("/"))

        message = await _change_message(relay)
        assert message["To"] == NEW_EMAIL
        assert message.get_content_type() == "multipart/alternative"
        text, html = parts_of(message)
        link = link_to(message, "/auth/change-email/")
        assert link.startswith(f"{BASE_URL}/auth/change-email/")
        assert link in text
        assert f'href="{link}"' in html
        # Nothing changes before the link is opened.
        assert await _emails(app) == ["alice@example.com"]

        changed = await client.get(urlsplit(link).path)
        assert changed.status_code == 200
        assert "Email address changed" in await page_text(changed)
        assert "Hello, alice!" in await page_text(await client.get("/"))

        await client.get("/auth/logout")
        old = await login(client)
        assert old.status_code == 200
        assert "Invalid email or password." in await page_text(old)
        new = await login(client, email=NEW_EMAIL)
        assert new.status_code == 302
        assert new.headers["Location"] == "/"

    assert await _emails(app) == [NEW_EMAIL]


async def test_change_email_old_address_told(app: Quart, relay: Relay) -> None:
    async with serving(app) as client:
        await sign_up(client, relay)
        await _request_change(client)
        assert (
            await client.get(_change_path(await _change_message(relay)))
        ).status_code == 200
        notice = await next_message_about(relay, "Your Email Address Was Changed")
    text, html = parts_of(notice)
    assert notice["To"] == "alice@example.com"
    assert "from alice@example.com to alice.new@example.com" in text
    assert "<b>alice.new@example.com</b>" in html


async def test_change_email_link_void_after_password_change(
    app: Quart, relay: Relay
) -> None:
    # Someone who knew the password for a while requests a move; the owner
    # notices and changes the password, which must void that link.
    async with serving(app) as client:
        await sign_up(client, relay)
        await _request_change(client, email="intruder@example.com")
        path = _change_path(await _change_message(relay))
        token = await csrf_token(client, "/auth/change-password")
        changed = await client.post(
            "/auth/change-password",
            form={
                "csrf_token": token,
                "old_password": PASSWORD,
                "password": "the owner's new passphrase",
                "password2": "the owner's new passphrase",
            },
        )
        assert changed.status_code == 302
    async with serving(app) as intruder:
        response = await intruder.get(path)
        assert response.status_code == 400
        assert "This link is not valid" in await page_text(response)
    assert await _emails(app) == ["alice@example.com"]


async def test_change_email_link_logged_out(app: Quart, relay: Relay) -> None:
    async with serving(app) as client:
        await sign_up(client, relay)
        await _request_change(client)
        path = _change_path(await _change_message(relay))
    async with serving(app) as other:
        response = await other.get(path)
        assert response.status_code == 200
        assert 'href="/auth/login"' in await page_text(response)
    assert await _emails(app) == [NEW_EMAIL]


async def test_change_email_link_works_once(app: Quart, relay: Relay) -> None:
    async with serving(app) as client:
        await sign_up(client, relay)
        await _request_change(client)
        path = _change_path(await _change_message(relay))
        assert (await client.get(path)).status_code == 200
        again = await client.get(path)
        assert again.status_code == 400
        assert "This link is not valid" in await page_text(again)


async def test_change_email_older_link_void(app: Quart, relay: Relay) -> None:
    async with serving(app) as client:
        await sign_up(client, relay)
        await _request_change(client, email="first@example.com")
        first = _change_path(await _change_message(relay))
        await _request_change(client, email="second@example.com")
        second = _change_path(await _change_message(relay))

        assert (await client.get(second)).status_code == 200
        stale = await client.get(first)
        assert stale.status_code == 400
        assert "This link is not valid" in await page_text(stale)
    assert await _emails(app) == ["second@example.com"]


async def test_change_email_taken_meanwhile(app: Quart, relay: Relay) -> None:
    async with serving(app) as client:
        await sign_up(client, relay)
        await _request_change(client, email="carol@example.com")
        path = _change_path(await _change_message(relay))
    async with serving(app) as other:
        await register(other, email="Carol@Example.com", username="carol")
    async with serving(app) as client:
        response = await client.get(path)
        page = await page_text(response)
        assert response.status_code == 409
        assert "This address is already registered" in page
        assert "<title>Address already registered - Quart App</title>" in page
    assert await _emails(app) == ["alice@example.com", "carol@example.com"]


async def test_change_email_taken_other_case(app: Quart, relay: Relay) -> None:
    async with serving(app) as client:
        await register(client, email="bob@example.com", username="bob")
        await client.get("/auth/logout")
        await sign_up(client, relay)
        response = await _request_change(client, email="BOB@Example.COM")
        assert response.status_code == 200
        assert "That email address is already registered." in await page_text(response)
    assert _change_emails(relay) == []


async def test_change_email_same_address(app: Quart, relay: Relay) -> None:
    async with serving(app) as client:
        await sign_up(client, relay)
        response = await _request_change(client, email="ALICE@example.com")
        assert response.status_code == 200
        assert "That is already your email address." in await page_text(response)
    assert _change_emails(relay) == []


async def test_change_email_wrong_password(app: Quart, relay: Relay) -> None:
    async with serving(app) as client:
        await sign_up(client, relay)
        response = await _request_change(client, password="not my password")
        assert response.status_code == 200
        assert "The password is incorrect." in await page_text(response)
    assert _change_emails(relay) == []
    assert await _emails(app) == ["alice@example.com"]


@pytest.mark.parametrize(
    "email",
    [
        "new@example.com\r\nBcc: victim@example.com",
        "new@example.com\nBcc: victim@example.com",
        "new@example.com\x00",
        "new@example.com, victim@example.com",
        "<script>alert(1)</script>@example.com",
        "josé@example.com",
        "not-an-email",
        "a" * 250 + "@example.com",
        "",
    ],
)
async def test_change_email_hostile_input(app: Quart, relay: Relay, email: str) -> None:
    async with serving(app) as client:
        await sign_up(client, relay)
        response = await _request_change(client, email=email)
        assert response.status_code == 200
        page = await page_text(response)
        assert 'class="error"' in page
        assert "<script>alert(1)</script>" not in page
    assert _change_emails(relay) == []
    for envelope in relay.envelopes:
        assert "victim@example.com" not in envelope.rcpt_tos


async def test_change_email_html_part_escaped(app: Quart, relay: Relay) -> None:
    # Quotes and ampersands are valid in the part before the @.
    address = "o'hara&co@example.com"
    async with serving(app) as client:
        await sign_up(client, relay)
        response = await _request_change(client, email=address)
        assert response.status_code == 302
        message = await _change_message(relay)
    text, html = parts_of(message)
    assert message["To"] == address
    assert address in text
    assert "o&#39;hara&amp;co@example.com" in html
    assert address not in html


@pytest.mark.parametrize("token", [None, "forged"])
async def test_change_email_missing_csrf(
    app: Quart, relay: Relay, token: str | None
) -> None:
    form = {"email": NEW_EMAIL, "password": PASSWORD}
    if token is not None:
        form["csrf_token"] = token
    async with serving(app) as client:
        await sign_up(client, relay)
        response = await client.post("/auth/change-email", form=form)
        assert response.status_code == 400
        assert "security token" in await page_text(response)
    assert _change_emails(relay) == []


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_change_email_needs_login(client: QuartClient, method: str) -> None:
    response = await client.open("/auth/change-email", method=method)
    assert response.status_code == 302
    assert response.headers["Location"] == "/auth/login?next=/auth/change-email"


async def test_change_email_forged_host(app: Quart, relay: Relay) -> None:
    async with serving(app) as client:
        await sign_up(client, relay)
        response = await _request_change(
            client, headers={"Host": "evil.example", "X-Forwarded-Host": "evil.example"}
        )
        assert response.status_code == 302
        message = await _change_message(relay)
    text, html = parts_of(message)
    assert "evil.example" not in text
    assert "evil.example" not in html
    assert link_to(message, "/auth/change-email/").startswith(
        f"{BASE_URL}/auth/change-email/"
    )


async def test_change_email_rate_limited(
    database_url: str, relay: Relay, tmp_path: Path
) -> None:
    app = make_app(database_url, relay.port, tmp_path, EMAIL_CHANGE_INTERVAL=60)
    async with serving(app) as client:
        await sign_up(client, relay)
        first = await _request_change(client, email="first@example.com")
        assert first.status_code == 302
        second = await _request_change(client, email="second@example.com")
        assert second.status_code == 200
        assert "less than 60 seconds ago" in await page_text(second)
    assert [message["To"] for message in _change_emails(relay)] == ["first@example.com"]


async def test_change_email_confirms_account(app: Quart, relay: Relay) -> None:
    # A user who mistyped the address at signup can correct it while still
    # unconfirmed, and the link to the new address confirms the account.
    async with serving(app) as client:
        await register(client, email="alice@exmaple.com")
        response = await _request_change(client)
        assert response.status_code == 302
        path = _change_path(await _change_message(relay))
        assert (await client.get(path)).status_code == 200
        assert "Hello, alice!" in await page_text(await client.get("/"))
    [user] = await fetch_users(app)
    assert user.email == NEW_EMAIL
    assert user.confirmed


@pytest.mark.parametrize("bad", ["garbage", "a.b.c", "%00"])
async def test_change_email_bad_token(app: Quart, relay: Relay, bad: str) -> None:
    async with serving(app) as client:
        await sign_up(client, relay)
        response = await client.get(f"/auth/change-email/{bad}")
        assert response.status_code == 400
        assert "This link is not valid" in await page_text(response)
    assert await _emails(app) == ["alice@example.com"]


async def test_reset_link_void_after_email_change(app: Quart, relay: Relay) -> None:
    async with serving(app) as client:
        await sign_up(client, relay)
        token = await csrf_token(client, "/auth/reset")
        await client.post(
            "/auth/reset", form={"csrf_token": token, "email": "alice@example.com"}
        )
        reset = await next_message_about(relay, "Reset Your Password")
        reset_path = urlsplit(link_to(reset, "/auth/reset/")).path

        await _request_change(client)
        assert (
            await client.get(_change_path(await _change_message(relay)))
        ).status_code == 200
        response = await client.get(reset_path)
        assert response.status_code == 400


async def test_change_email_expired_token(app: Quart, relay: Relay) -> None:
    async with serving(app) as client:
        await sign_up(client, relay)
        await _request_change(client)
        token = _change_path(await _change_message(relay)).rsplit("/", 1)[1]
        async with app.app_context():
            payload = load_token(Purpose.CHANGE_EMAIL, token)
            expired = generate_token(
                Purpose.CHANGE_EMAIL, payload, issued_at=int(time.time()) - 7200
            )
        response = await client.get(f"/auth/change-email/{expired}")
        assert response.status_code == 400
        assert "This link has expired" in await page_text(response)
    assert await _emails(app) == ["alice@example.com"]


async def test_change_email_link_other_purpose(app: Quart, relay: Relay) -> None:
    async with serving(app) as client:
        await sign_up(client, relay)
        await _request_change(client)
        token = _change_path(await _change_message(relay)).rsplit("/", 1)[1]
        async with app.app_context():
            payload = load_token(Purpose.CHANGE_EMAIL, token)
            as_reset = generate_token(Purpose.RESET_PASSWORD, payload)
            as_confirm = generate_token(Purpose.CONFIRM, payload)

        for path in (
            f"/auth/reset/{token}",
            f"/auth/confirm/{token}",
            f"/auth/change-email/{as_reset}",
            f"/auth/change-email/{as_confirm}",
        ):
            response = await client.get(path)
            assert response.status_code == 400, path
            assert "This link is not valid" in await page_text(response), path
    assert await _emails(app) == ["alice@example.com"]


async def test_change_email_unique_index_logged_in(app: Quart, relay: Relay) -> None:
    # The unique index catches the address that another user took, and the
    # transaction rolls back under the logged-in user, whose name the error
    # page still shows.
    async with serving(app) as client:
        await sign_up(client, relay)
        await _request_change(client, email="carol@example.com")
        path = _change_path(await _change_message(relay))
    async with serving(app) as other:
        await register(other, email="carol@example.com", username="carol")

    async with serving(app) as client:
        assert (await login(client)).status_code == 302
        response = await client.get(path)
        assert response.status_code == 409
        page = await page_text(response)
        assert "This address is already registered" in page
        assert '<span class="who">alice</span>' in page
    assert await _emails(app) == ["alice@example.com", "carol@example.com"]


def _changed_notices(relay: Relay) -> list[EmailMessage]:
    subject = "[Quart App] Your Email Address Was Changed"
    return [message for message in relay.messages if message["Subject"] == subject]


async def test_change_email_link_opened_at_once(app: Quart, relay: Relay) -> None:
    # A mail scanner may fetch the link while its owner clicks it.
    async with serving(app) as client:
        await sign_up(client, relay)
        await _request_change(client)
        path = _change_path(await _change_message(relay))
    async with serving(app) as client:
        responses = await asyncio.gather(*(client.get(path) for _ in range(8)))

    statuses = sorted(response.status_code for response in responses)
    assert statuses == [200] + [400] * 7
    assert await _emails(app) == [NEW_EMAIL]
    assert len(_changed_notices(relay)) == 1


async def test_change_email_two_links_at_once(app: Quart, relay: Relay) -> None:
    async with serving(app) as client:
        await sign_up(client, relay)
        await _request_change(client, email="first@example.com")
        first = _change_path(await _change_message(relay))
        await _request_change(client, email="second@example.com")
        second = _change_path(await _change_message(relay))
    async with serving(app) as client:
        responses = await asyncio.gather(client.get(first), client.get(second))

    statuses = [response.status_code for response in responses]
    assert sorted(statuses) == [200, 400]
    winner = "first@example.com" if statuses[0] == 200 else "second@example.com"
    assert await _emails(app) == [winner]
    [notice] = _changed_notices(relay)
    text, _html = parts_of(notice)
    assert f"to {winner}" in text


async def test_change_email_wrong_counts_for_lockout(
    database_url: str, relay: Relay, tmp_path: Path
) -> None:
    app = make_app(database_url, relay.port, tmp_path, LOGIN_MAX_FAILURES=2)
    async with serving(app) as client:
        await sign_up(client, relay)
        for _ in range(2):
            wrong = await _request_change(client, password="not my password")
            assert wrong.status_code == 200
        locked = await _request_change(client)
        page = await page_text(locked)

    assert locked.status_code == 429
    assert 0 < int(locked.headers["Retry-After"]) <= 900
    assert "Too many wrong passwords for this account" in page
    assert _change_emails(relay) == []


async def test_change_email_right_password_clears_count(
    database_url: str, relay: Relay, tmp_path: Path
) -> None:
    app = make_app(database_url, relay.port, tmp_path, LOGIN_MAX_FAILURES=2)
    async with serving(app) as client:
        await sign_up(client, relay)
        assert (await _request_change(client, password="not mine")).status_code == 200
        assert (await _request_change(client)).status_code == 302

    [user] = await fetch_users(app)
    assert user.failed_logins == 0
    assert user.last_failed_login_at is None
