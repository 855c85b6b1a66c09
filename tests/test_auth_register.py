import asyncio
import re
from urllib.parse import urlsplit

import pytest
from quart import Quart
from quart.testing import QuartClient

from quart_app.models import Role, User
from tests.conftest import (
    ADMIN_EMAIL,
    BASE_URL,
    Relay,
    confirm_link,
    fetch_users,
    login,
    page_text,
    parts_of,
    register,
    serving,
)


async def _count_users(app: Quart) -> int:
    return len(await fetch_users(app))


async def _user(app: Quart, email: str) -> User | None:
    matches = [user for user in await fetch_users(app) if user.email == email]
    return matches[0] if matches else None


async def test_signup_confirm_login_flow(app: Quart, relay: Relay) -> None:
    async with serving(app) as client:
        response = await register(client, email="Alice@Example.com")
        assert response.status_code == 302
        assert response.headers["Location"] == "/auth/unconfirmed"

        first = await relay.next_message()
        second = await relay.next_message()
        by_subject = {message["Subject"]: message for message in (first, second)}
        confirmation = by_subject["[Quart App] Confirm Your Account"]
        notice = by_subject["[Quart App] New User"]

        assert confirmation["To"] == "alice@example.com"
        assert confirmation.get_content_type() == "multipart/alternative"
        text, html = parts_of(confirmation)
        link = confirm_link(confirmation)
        assert link.startswith(f"{BASE_URL}/auth/confirm/")
        assert link in text
        assert f'href="{link}"' in html

        assert notice["To"] == ADMIN_EMAIL
        notice_text, _ = parts_of(notice)
        assert "alice" in notice_text

        unconfirmed = await client.get("/")
        assert unconfirmed.status_code == 302
        assert unconfirmed.headers["Location"] == "/auth/unconfirmed"

        confirmed = await client.get(urlsplit(link).path)
        assert confirmed.status_code == 200
        assert "Account confirmed" in await page_text(confirmed)

        await client.get("/auth/logout")
        response = await login(client, email="ALICE@example.com")
        assert response.status_code == 302
        assert response.headers["Location"] == "/"
        home = await client.get("/")
        assert home.status_code == 200
        assert "Hello, alice!" in await page_text(home)

    user = await _user(app, "alice@example.com")
    assert user is not None
    assert user.confirmed
    async with app.app_context():
        assert user.role is Role.USER


async def test_register_returns_while_relay_holds(app: Quart, relay: Relay) -> None:
    relay.hold = True
    async with serving(app) as client:
        response = await register(client)
        # The response is back although the relay has not accepted anything.
        assert response.status_code == 302
        assert relay.messages == []

        await asyncio.wait_for(relay.data_started.wait(), 10)
        assert relay.messages == []
        relay.release.set()
        subjects = {(await relay.next_message())["Subject"] for _ in range(2)}
        assert "[Quart App] Confirm Your Account" in subjects


async def test_register_admin_gets_role(app: Quart, relay: Relay) -> None:
    async with serving(app) as client:
        response = await register(client, email="Admin@Example.com", username="boss")
        assert response.status_code == 302
    user = await _user(app, ADMIN_EMAIL)
    assert user is not None
    async with app.app_context():
        assert user.role is Role.ADMINISTRATOR
        # The role counts only once the address is confirmed.
        assert not user.is_administrator
        user.confirmed = True
        assert user.is_administrator


@pytest.mark.parametrize(
    ("second_email", "second_username", "error"),
    [
        ("ALICE@example.COM", "alice2", "That email address is already registered."),
        (" alice@example.com ", "alice3", "That email address is already registered."),
        ("other@example.com", "ALICE", "That username is already taken."),
    ],
)
async def test_register_duplicate_rejected(
    app: Quart, relay: Relay, second_email: str, second_username: str, error: str
) -> None:
    async with serving(app) as client:
        assert (await register(client)).status_code == 302
        await client.get("/auth/logout")
        response = await register(client, email=second_email, username=second_username)
        assert response.status_code == 200
        assert error in await page_text(response)

    assert await _count_users(app) == 1
    subjects = sorted(message["Subject"] for message in relay.messages)
    assert subjects == ["[Quart App] Confirm Your Account", "[Quart App] New User"]


@pytest.mark.parametrize(
    "email",
    [
        "not-an-email",
        "alice@",
        "@example.com",
        "alice@example.com\r\nBcc: victim@example.com",
        "alice@example.com\nBcc: victim@example.com",
        "alice@exa mple.com",
        "a" * 250 + "@example.com",
        "",
    ],
)
async def test_register_invalid_email(app: Quart, relay: Relay, email: str) -> None:
    async with serving(app) as client:
        response = await register(client, email=email)
        assert response.status_code == 200
        page = await page_text(response)
        assert 'class="error"' in page
    assert await _count_users(app) == 0
    assert relay.messages == []


@pytest.mark.parametrize(
    "username",
    [
        "bob\r\nBcc: victim@example.com",
        "bob\nSubject: hi",
        "<script>alert(1)</script>",
        "1bob",
        "bob smith",
        "b" * 65,
        "",
    ],
)
async def test_register_invalid_username(
    app: Quart, relay: Relay, username: str
) -> None:
    async with serving(app) as client:
        response = await register(client, username=username)
        assert response.status_code == 200
        assert 'class="error"' in await page_text(response)
    assert await _count_users(app) == 0
    assert relay.messages == []


async def test_register_mismatched_passwords(app: Quart, relay: Relay) -> None:
    async with serving(app) as client:
        response = await register(client, password2="something else")
        assert response.status_code == 200
        assert "The passwords do not match." in await page_text(response)
    assert await _count_users(app) == 0


@pytest.mark.parametrize("password", ["short", "x" * 129])
async def test_register_password_length(
    app: Quart, relay: Relay, password: str
) -> None:
    async with serving(app) as client:
        response = await register(client, password=password)
        assert response.status_code == 200
        assert "Use 8 to 128 characters." in await page_text(response)
    assert await _count_users(app) == 0


async def test_register_form_keeps_input_escaped(app: Quart, relay: Relay) -> None:
    async with serving(app) as client:
        response = await register(client, email='"><script>x()</script>@example.com')
        page = await page_text(response)
    assert "<script>x()</script>" not in page
    assert "&lt;script&gt;" in page or "&#34;&gt;&lt;script" in page


@pytest.mark.parametrize("token", [None, "", "forged-token", "20991231000000##abc"])
async def test_register_bad_csrf_rejected(
    app: Quart, relay: Relay, token: str | None
) -> None:
    form = {
        "email": "alice@example.com",
        "username": "alice",
        "password": "long enough password",
        "password2": "long enough password",
    }
    if token is not None:
        form["csrf_token"] = token
    async with serving(app) as client:
        response = await client.post("/auth/register", form=form)
        assert response.status_code == 400
        assert "security token" in await page_text(response)
    assert await _count_users(app) == 0
    assert relay.messages == []


async def test_register_csrf_from_other_session(app: Quart, relay: Relay) -> None:
    async with serving(app) as client:
        page = await (await client.get("/auth/register")).get_data(as_text=True)
        token = re.search(r'name="csrf_token" type="hidden" value="([^"]+)"', page)
        assert token is not None
    async with serving(app) as other:
        response = await other.post(
            "/auth/register",
            form={
                "csrf_token": token.group(1),
                "email": "alice@example.com",
                "username": "alice",
                "password": "long enough password",
                "password2": "long enough password",
            },
        )
        assert response.status_code == 400
    assert await _count_users(app) == 0


async def test_register_forged_host_not_in_link(app: Quart, relay: Relay) -> None:
    async with serving(app) as client:
        response = await register(
            client, headers={"Host": "evil.example", "X-Forwarded-Host": "evil.example"}
        )
        assert response.status_code == 302
        message = await relay.next_message()
        while "Confirm Your Account" not in message["Subject"]:
            message = await relay.next_message()
    text, html = parts_of(message)
    assert "evil.example" not in text
    assert "evil.example" not in html
    assert confirm_link(message).startswith(f"{BASE_URL}/auth/confirm/")


async def test_register_body_is_not_a_header(app: Quart, relay: Relay) -> None:
    async with serving(app) as client:
        await register(client, username="Bcc")
    for message in relay.messages:
        assert message["Bcc"] is None
        assert message["Subject"].count("\n") == 0
    recipients = sorted(
        rcpt for envelope in relay.envelopes for rcpt in envelope.rcpt_tos
    )
    assert recipients == [ADMIN_EMAIL, "alice@example.com"]


async def test_register_get_renders_form(client: QuartClient) -> None:
    response = await client.get("/auth/register")
    page = await page_text(response)
    assert response.status_code == 200
    for name in ("csrf_token", "email", "username", "password", "password2"):
        assert f'name="{name}"' in page


async def test_register_oversized_body_rejected(client: QuartClient) -> None:
    response = await client.post(
        "/auth/register",
        data="email=" + "a" * (2 * 1024 * 1024),
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert response.status_code == 413


@pytest.mark.parametrize(
    "email",
    ["josé@example.com", "jose\u0301@example.com", "\uff45ve@example.com"],
)
async def test_register_non_ascii_local_part(
    app: Quart, relay: Relay, email: str
) -> None:
    async with serving(app) as client:
        response = await register(client, email=email)
        assert response.status_code == 200
        assert "before the @-sign are not supported" in await page_text(response)
    assert await _count_users(app) == 0
    assert relay.messages == []


async def test_register_idn_domain_one_account(app: Quart, relay: Relay) -> None:
    async with serving(app) as client:
        assert (await register(client, email="carol@Bücher.example")).status_code == 302
        await client.get("/auth/logout")
        again = await register(
            client, email="carol@xn--bcher-kva.example", username="carol2"
        )
        assert again.status_code == 200
        assert "already registered" in await page_text(again)
    [user] = await fetch_users(app)
    assert user.email == "carol@xn--bcher-kva.example"
    confirmation = [m for m in relay.messages if "Confirm" in m["Subject"]]
    assert [message["To"] for message in confirmation] == [
        "carol@xn--bcher-kva.example"
    ]
