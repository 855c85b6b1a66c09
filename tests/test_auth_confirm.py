import asyncio
import time
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from quart import Quart
from quart.testing import QuartClient
from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncSession

from quart_app.db import create_engine
from quart_app.models import User, utcnow
from quart_app.tokens import Purpose, generate_token
from tests.conftest import (
    Relay,
    confirm_link,
    csrf_token,
    fetch_users,
    login,
    make_app,
    page_text,
    register,
    serving,
)


async def _confirmation(relay: Relay) -> str:
    """Wait for the next confirmation email and return its link's path."""
    while True:
        message = await relay.next_message()
        if "Confirm Your Account" in message["Subject"]:
            return urlsplit(confirm_link(message)).path


async def _token(app: Quart, purpose: Purpose, payload: dict, **options: int) -> str:
    async with app.app_context():
        return generate_token(purpose, payload, **options)


async def test_confirm_logged_out(app: Quart, relay: Relay) -> None:
    async with serving(app) as client:
        await register(client)
        path = await _confirmation(relay)
        await client.get("/auth/logout")

        response = await client.get(path)
        page = await page_text(response)
        assert response.status_code == 200
        assert "Account confirmed" in page
        assert 'href="/auth/login"' in page

    [user] = await fetch_users(app)
    assert user.confirmed


async def test_confirm_twice_says_already(app: Quart, relay: Relay) -> None:
    async with serving(app) as client:
        await register(client)
        path = await _confirmation(relay)
        assert (await client.get(path)).status_code == 200
        again = await client.get(path)
        assert again.status_code == 200
        assert "Account already confirmed" in await page_text(again)


async def test_confirm_tampered_token(app: Quart, relay: Relay) -> None:
    async with serving(app) as client:
        await register(client)
        path = await _confirmation(relay)
        token = path.rsplit("/", 1)[1]
        tampered = token[:-2] + ("AA" if not token.endswith("AA") else "BB")
        for bad in (tampered, "garbage", "a.b.c", token + "x", "%00", "%2e%2e"):
            response = await client.get(f"/auth/confirm/{bad}")
            assert response.status_code == 400, bad
            assert "This link is not valid" in await page_text(response)

    [user] = await fetch_users(app)
    assert not user.confirmed


async def test_confirm_expired_token(app: Quart, relay: Relay) -> None:
    async with serving(app) as client:
        await register(client)
        [user] = await fetch_users(app)
        two_hours_ago = int(time.time()) - 7200
        token = await _token(
            app,
            Purpose.CONFIRM,
            {"confirm": user.id, "email": user.email},
            issued_at=two_hours_ago,
        )
        response = await client.get(f"/auth/confirm/{token}")
        assert response.status_code == 400
        assert "This link has expired" in await page_text(response)

    [user] = await fetch_users(app)
    assert not user.confirmed


async def test_confirm_token_just_in_time(app: Quart, relay: Relay) -> None:
    async with serving(app) as client:
        await register(client)
        [user] = await fetch_users(app)
        fifty_minutes_ago = int(time.time()) - 3000
        token = await _token(
            app,
            Purpose.CONFIRM,
            {"confirm": user.id, "email": user.email},
            issued_at=fifty_minutes_ago,
        )
        response = await client.get(f"/auth/confirm/{token}")
        assert response.status_code == 200


@pytest.mark.parametrize("purpose", [Purpose.RESET_PASSWORD, Purpose.CHANGE_EMAIL])
async def test_confirm_other_purpose_token(
    app: Quart, relay: Relay, purpose: Purpose
) -> None:
    async with serving(app) as client:
        await register(client)
        [user] = await fetch_users(app)
        token = await _token(app, purpose, {"confirm": user.id, "email": user.email})
        response = await client.get(f"/auth/confirm/{token}")
        assert response.status_code == 400
        assert "This link is not valid" in await page_text(response)

    [user] = await fetch_users(app)
    assert not user.confirmed


@pytest.mark.parametrize(
    "payload",
    [
        {"confirm": 999, "email": "alice@example.com"},
        {"confirm": 1, "email": "someone-else@example.com"},
        {"confirm": "1; DROP TABLE users", "email": "alice@example.com"},
        {"email": "alice@example.com"},
        {},
    ],
)
async def test_confirm_token_wrong_user(
    app: Quart, relay: Relay, payload: dict
) -> None:
    async with serving(app) as client:
        await register(client)
        token = await _token(app, Purpose.CONFIRM, payload)
        response = await client.get(f"/auth/confirm/{token}")
        assert response.status_code == 400

    [user] = await fetch_users(app)
    assert not user.confirmed


async def test_confirm_token_from_other_secret(
    app: Quart, relay: Relay, tmp_path: object
) -> None:
    other = Quart(__name__)
    other.secret_key = "another secret"
    other.config["TOKEN_MAX_AGE"] = 3600
    async with serving(app) as client:
        await register(client)
        [user] = await fetch_users(app)
        async with other.app_context():
            token = generate_token(
                Purpose.CONFIRM, {"confirm": user.id, "email": user.email}
            )
        response = await client.get(f"/auth/confirm/{token}")
        assert response.status_code == 400


async def test_unconfirmed_user_redirected(app: Quart, relay: Relay) -> None:
    async with serving(app) as client:
        await register(client)
        response = await client.get("/")
        assert response.status_code == 302
        assert response.headers["Location"] == "/auth/unconfirmed"
        page = await client.get("/auth/unconfirmed")
        assert page.status_code == 200
        text = await page_text(page)
        assert "You have not confirmed your account yet." in text
        assert 'action="/auth/confirm"' in text
        health = await client.get("/healthz")
        assert health.status_code == 200


async def test_unconfirmed_page_needs_login(client: QuartClient) -> None:
    response = await client.get("/auth/unconfirmed")
    assert response.status_code == 302
    assert response.headers["Location"].startswith("/auth/login")


async def test_resend_sends_working_link(app: Quart, relay: Relay) -> None:
    async with serving(app) as client:
        await register(client)
        await _confirmation(relay)

        token = await csrf_token(client, "/auth/unconfirmed")
        response = await client.post("/auth/confirm", form={"csrf_token": token})
        assert response.status_code == 302
        assert response.headers["Location"] == "/auth/unconfirmed"
        second = await _confirmation(relay)
        assert second.startswith("/auth/confirm/")

        confirmed = await client.get(second)
        assert confirmed.status_code == 200
        assert "Account confirmed" in await page_text(confirmed)


async def test_resend_needs_csrf(app: Quart, relay: Relay) -> None:
    async with serving(app) as client:
        await register(client)
        await _confirmation(relay)
        response = await client.post("/auth/confirm", form={})
        assert response.status_code == 400
        forged = await client.post("/auth/confirm", form={"csrf_token": "forged"})
        assert forged.status_code == 400
    subjects = [message["Subject"] for message in relay.messages]
    assert subjects.count("[Quart App] Confirm Your Account") == 1


async def test_resend_needs_login(client: QuartClient, relay: Relay) -> None:
    response = await client.post("/auth/confirm", form={})
    assert response.status_code == 302
    assert response.headers["Location"].startswith("/auth/login")
    assert relay.messages == []


async def test_resend_interval_limits_repeats(
    database_url: str, relay: Relay, tmp_path: object
) -> None:
    app = make_app(database_url, relay.port, tmp_path, CONFIRMATION_RESEND_INTERVAL=60)
    async with serving(app) as client:
        await register(client)
        await _confirmation(relay)
        token = await csrf_token(client, "/auth/unconfirmed")
        response = await client.post("/auth/confirm", form={"csrf_token": token})
        assert response.status_code == 302
        page = await client.get("/auth/unconfirmed")
        assert "less than 60 seconds ago" in await page_text(page)
    subjects = [message["Subject"] for message in relay.messages]
    assert subjects.count("[Quart App] Confirm Your Account") == 1


async def test_resend_when_confirmed_sends_nothing(app: Quart, relay: Relay) -> None:
    async with serving(app) as client:
        await register(client)
        path = await _confirmation(relay)
        await client.get(path)
        token = await csrf_token(client, "/auth/login")
        response = await client.post("/auth/confirm", form={"csrf_token": token})
        assert response.status_code == 302
        assert response.headers["Location"] == "/"
    subjects = [message["Subject"] for message in relay.messages]
    assert subjects.count("[Quart App] Confirm Your Account") == 1


async def test_confirmed_user_sees_home(app: Quart, relay: Relay) -> None:
    async with serving(app) as client:
        await register(client)
        await client.get(await _confirmation(relay))
        home = await client.get("/")
        assert home.status_code == 200
        assert "Hello, alice!" in await page_text(home)
        assert (await client.get("/auth/unconfirmed")).headers["Location"] == "/"


async def test_login_after_confirm_elsewhere(app: Quart, relay: Relay) -> None:
    async with serving(app) as client:
        await register(client)
        path = await _confirmation(relay)
    async with serving(app) as other:
        assert (await other.get(path)).status_code == 200
        response = await login(other)
        assert response.headers["Location"] == "/"


async def test_resend_concurrent_requests_send_once(
    database_url: str, relay: Relay, tmp_path: Path
) -> None:
    app = make_app(database_url, relay.port, tmp_path, CONFIRMATION_RESEND_INTERVAL=60)
    async with serving(app) as client:
        await register(client)
        await _confirmation(relay)
        engine = create_engine(database_url)
        async with AsyncSession(engine) as session:
            await session.execute(
                update(User).values(confirmation_sent_at=utcnow() - timedelta(hours=1))
            )
            await session.commit()
        await engine.dispose()

        token = await csrf_token(client, "/auth/unconfirmed")
        responses = await asyncio.gather(
            *(
                client.post("/auth/confirm", form={"csrf_token": token})
                for _ in range(8)
            )
        )
        assert all(response.status_code == 302 for response in responses)
    subjects = [message["Subject"] for message in relay.messages]
    assert subjects.count("[Quart App] Confirm Your Account") == 2
