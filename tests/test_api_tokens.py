import asyncio
import base64
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from quart import Quart
from quart.testing import QuartClient
from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncSession

from quart_app.api.tokens import issue_token
from quart_app.config import load_settings
from quart_app.db import create_engine
from quart_app.errors import ConfigError
from quart_app.models import User
from quart_app.passwords import hash_password
from quart_app.tokens import Purpose, generate_token
from tests.api import basic_auth, bearer, get_token, signup
from tests.conftest import PASSWORD, Relay, fetch_users, login, make_app, serving


async def _issue(app: Quart, user: User, *, issued_at: int | None = None) -> str:
    async with app.app_context():
        return issue_token(user, issued_at=issued_at).token


async def _set_password_hash(app: Quart, user_id: int, password_hash: str) -> None:
    engine = create_engine(app.config["DATABASE_URL"])
    try:
        async with AsyncSession(engine) as session:
            await session.execute(
                update(User)
                .where(User.id == user_id)
                .values(password_hash=password_hash)
            )
            await session.commit()
    finally:
        await engine.dispose()


async def test_token_issued_for_right_password(
    client: QuartClient, relay: Relay
) -> None:
    await signup(client, relay)
    before = datetime.now(UTC)

    response = await client.post(
        "/api/tokens", headers=basic_auth("Alice@Example.com", PASSWORD)
    )

    body = await response.get_json()
    assert response.status_code == 200
    assert response.headers["Cache-Control"] == "no-store"
    assert set(body) == {"token", "expires_at"}
    expires_at = datetime.fromisoformat(body["expires_at"])
    assert before + timedelta(seconds=3590) < expires_at
    assert expires_at <= datetime.now(UTC) + timedelta(seconds=3600)


async def test_token_issued_to_unconfirmed_user(
    client: QuartClient, relay: Relay
) -> None:
    await signup(client, relay, confirm=False)
    token = await get_token(client)

    response = await client.get("/api/users/me", headers=bearer(token))

    assert response.status_code == 200
    assert (await response.get_json())["confirmed"] is False


@pytest.mark.parametrize(
    ("headers", "error"),
    [
        ({}, "unauthorized"),
        ({"Authorization": ""}, "unauthorized"),
        ({"Authorization": "Basic"}, "unauthorized"),
        ({"Authorization": "Basic !!not base64!!"}, "unauthorized"),
        (
            {"Authorization": "Basic " + base64.b64encode(b"\xff\xfe:x").decode()},
            "unauthorized",
        ),
        ({"Authorization": "Basic \u00fc"}, "unauthorized"),
        ({"Authorization": "Basic abc\u00e9"}, "unauthorized"),
        ({"Authorization": "Bearer something"}, "unauthorized"),
        ({"Authorization": "Digest username=alice"}, "unauthorized"),
        (
            {
                "Authorization": "Basic "
                + base64.b64encode(b"alice@example.com").decode()
            },
            "unauthorized",
        ),
        (basic_auth("nobody@example.com", PASSWORD), "invalid_credentials"),
        (basic_auth("alice@example.com", "wrong password"), "invalid_credentials"),
        (basic_auth("alice@example.com", ""), "invalid_credentials"),
        (
            basic_auth("alice@example.com", PASSWORD + "x" * 10_000),
            "invalid_credentials",
        ),
        (basic_auth("a" * 5000 + "@example.com", PASSWORD), "invalid_credentials"),
        (basic_auth("alice@example.com\r\nX: y", PASSWORD), "invalid_credentials"),
    ],
)
async def test_token_bad_credentials_rejected(
    client: QuartClient, relay: Relay, headers: dict[str, str], error: str
) -> None:
    await signup(client, relay)

    response = await client.post("/api/tokens", headers=headers)

    body = await response.get_json()
    assert response.status_code == 401
    assert body["error"] == error
    assert body["detail"]
    assert response.headers["WWW-Authenticate"].startswith('Basic realm="api"')


async def test_token_login_cookie_not_enough(client: QuartClient, relay: Relay) -> None:
    await signup(client, relay)
    assert (await login(client)).status_code == 302

    tokens = await client.post("/api/tokens")
    me = await client.get("/api/users/me")

    assert tokens.status_code == 401
    assert me.status_code == 401


async def test_me_returns_token_owner(client: QuartClient, relay: Relay) -> None:
    await signup(client, relay)
    token = await get_token(client)

    response = await client.get("/api/users/me", headers=bearer(token))

    [user] = await fetch_users(client.app)
    assert response.status_code == 200
    assert await response.get_json() == {
        "id": user.id,
        "email": "alice@example.com",
        "username": "alice",
        "confirmed": True,
    }


@pytest.mark.parametrize(
    "authorization",
    [None, "", "Bearer", "Bearer ", "Basic abc", "Token abc", "bearer"],
)
async def test_me_without_token_rejected(
    client: QuartClient, relay: Relay, authorization: str | None
) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}

    response = await client.get("/api/users/me", headers=headers)

    assert response.status_code == 401
    assert (await response.get_json())["error"] == "unauthorized"
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="api"'


async def test_me_scheme_name_any_case(client: QuartClient, relay: Relay) -> None:
    await signup(client, relay)
    token = await get_token(client)

    response = await client.get(
        "/api/users/me", headers={"Authorization": f"bEaReR {token}"}
    )

    assert response.status_code == 200


async def test_me_tampered_token_rejected(client: QuartClient, relay: Relay) -> None:
    await signup(client, relay)
    token = await get_token(client)
    payload, _, rest = token.partition(".")
    other_payload = base64.urlsafe_b64encode(b'{"sub":"1:0000000000000000"}')
    tampered = [
        token[:-2] + ("AA" if not token.endswith("AA") else "BB"),
        token + "x",
        other_payload.decode().rstrip("=") + "." + rest,
        "garbage",
        "a.b.c",
        "\u00e9" * 20,
        "x" * 10_000,
    ]

    for bad in tampered:
        response = await client.get("/api/users/me", headers=bearer(bad))
        assert response.status_code == 401, bad
        assert (await response.get_json())["error"] == "invalid_token", bad
        assert 'error="invalid_token"' in response.headers["WWW-Authenticate"], bad


async def test_me_expired_token_rejected(client: QuartClient, relay: Relay) -> None:
    await signup(client, relay)
    [user] = await fetch_users(client.app)
    two_hours_ago = int(time.time()) - 7200
    token = await _issue(client.app, user, issued_at=two_hours_ago)

    response = await client.get("/api/users/me", headers=bearer(token))

    body = await response.get_json()
    assert response.status_code == 401
    assert body["error"] == "token_expired"
    assert "POST /api/tokens" in body["detail"]
    assert 'error="invalid_token"' in response.headers["WWW-Authenticate"]


async def test_me_token_just_in_time(client: QuartClient, relay: Relay) -> None:
    await signup(client, relay)
    [user] = await fetch_users(client.app)
    fifty_minutes_ago = int(time.time()) - 3000
    token = await _issue(client.app, user, issued_at=fifty_minutes_ago)

    response = await client.get("/api/users/me", headers=bearer(token))

    assert response.status_code == 200


@pytest.mark.parametrize(
    "purpose", [Purpose.CONFIRM, Purpose.RESET_PASSWORD, Purpose.CHANGE_EMAIL]
)
async def test_me_link_token_not_bearer(
    client: QuartClient, relay: Relay, purpose: Purpose
) -> None:
    await signup(client, relay)
    [user] = await fetch_users(client.app)
    async with client.app.app_context():
        payloads = [
            {"confirm": user.id, "email": user.email},
            {"sub": user.auth_id},
        ]
        link_tokens = [generate_token(purpose, payload) for payload in payloads]

    for token in link_tokens:
        response = await client.get("/api/users/me", headers=bearer(token))
        assert response.status_code == 401
        assert (await response.get_json())["error"] == "invalid_token"


async def test_me_token_after_password_change(
    client: QuartClient, relay: Relay
) -> None:
    await signup(client, relay)
    token = await get_token(client)
    [user] = await fetch_users(client.app)
    async with client.app.app_context():
        new_hash = await hash_password("a brand new password")

    await _set_password_hash(client.app, user.id, new_hash)
    response = await client.get("/api/users/me", headers=bearer(token))
    fresh = await client.post(
        "/api/tokens", headers=basic_auth("alice@example.com", "a brand new password")
    )

    body = await response.get_json()
    assert response.status_code == 401
    assert body["error"] == "invalid_token"
    assert "password changed" in body["detail"]
    assert fresh.status_code == 200


@pytest.mark.parametrize("value", ["0", "-5", "an hour"])
def test_api_token_max_age_invalid(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("API_TOKEN_MAX_AGE", value)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert str(caught.value).startswith("Invalid setting API_TOKEN_MAX_AGE=")


@pytest.mark.parametrize("user_id", [2**31, 99_999_999_999])
async def test_me_token_for_huge_id_rejected(
    client: QuartClient, relay: Relay, user_id: int
) -> None:
    # Only a holder of SECRET_KEY could sign such a token, but it must still
    # get a 401 and not reach the database with an id out of range.
    async with client.app.app_context():
        token = issue_token(User(id=user_id, password_hash="x")).token

    response = await client.get("/api/users/me", headers=bearer(token))

    assert response.status_code == 401
    assert (await response.get_json())["error"] == "invalid_token"


async def test_token_locked_after_failures(
    database_url: str, relay: Relay, tmp_path: Path
) -> None:
    app = make_app(database_url, relay.port, tmp_path, LOGIN_MAX_FAILURES=2)
    async with serving(app) as client:
        await signup(client, relay)
        wrong = [
            await client.post(
                "/api/tokens", headers=basic_auth("alice@example.com", "wrong")
            )
            for _ in range(2)
        ]
        locked = await client.post(
            "/api/tokens", headers=basic_auth("alice@example.com", PASSWORD)
        )
        body = await locked.get_json()

    assert [response.status_code for response in wrong] == [401, 401]
    assert locked.status_code == 429
    assert body["error"] == "too_many_failed_logins"
    assert "reset the password" in body["detail"]
    assert 0 < int(locked.headers["Retry-After"]) <= 900


async def test_token_lockout_counts_requests_at_once(
    database_url: str, relay: Relay, tmp_path: Path
) -> None:
    app = make_app(database_url, relay.port, tmp_path, LOGIN_MAX_FAILURES=3)
    async with serving(app) as client:
        await signup(client, relay)
        responses = await asyncio.gather(
            *(
                client.post(
                    "/api/tokens", headers=basic_auth("alice@example.com", f"guess {n}")
                )
                for n in range(12)
            )
        )

    statuses = sorted(response.status_code for response in responses)
    assert statuses == [401] * 3 + [429] * 9
    [user] = await fetch_users(app)
    assert user.failed_logins == 3
