import asyncio
import time
from email.message import EmailMessage

import pytest
from quart.testing import QuartClient

from quart_app.tokens import Purpose, generate_token
from tests.api import basic_auth, bearer, get_token, signup
from tests.conftest import (
    PASSWORD,
    Relay,
    fetch_outbox,
    fetch_users,
    link_to,
    next_message_about,
)

RESET_SUBJECT = "Reset Your Password"
NEW_PASSWORD = "a brand new passphrase"


def _reset_token(message: EmailMessage) -> str:
    return link_to(message, "/auth/reset/").rsplit("/", 1)[1]


async def _requested_token(client: QuartClient, relay: Relay) -> str:
    """Ask for a reset of alice's password and return the token it emails."""
    response = await client.post(
        "/api/password-resets", json={"email": "alice@example.com"}
    )
    assert response.status_code == 202
    return _reset_token(await next_message_about(relay, RESET_SUBJECT))


async def test_reset_request_sends_email(client: QuartClient, relay: Relay) -> None:
    await signup(client, relay)

    response = await client.post(
        "/api/password-resets", json={"email": " ALICE@example.com "}
    )

    message = await next_message_about(relay, RESET_SUBJECT)
    assert response.status_code == 202
    assert message["To"] == "alice@example.com"
    assert "/auth/reset/" in link_to(message, "/auth/reset/")


async def test_reset_request_unknown_address_silent(
    client: QuartClient, relay: Relay
) -> None:
    await signup(client, relay)
    known = await client.post(
        "/api/password-resets", json={"email": "alice@example.com"}
    )
    await next_message_about(relay, RESET_SUBJECT)
    queued = len(await fetch_outbox(client.app))

    unknown = await client.post(
        "/api/password-resets", json={"email": "nobody@example.com"}
    )

    assert unknown.status_code == 202
    assert await unknown.get_json() == await known.get_json()
    assert len(await fetch_outbox(client.app)) == queued


async def test_reset_requests_at_once_all_sent(
    client: QuartClient, relay: Relay
) -> None:
    # PASSWORD_RESET_INTERVAL is 0 in the tests, which disables the limit.
    await signup(client, relay)
    before = len(await fetch_outbox(client.app))

    responses = await asyncio.gather(
        *(
            client.post("/api/password-resets", json={"email": "alice@example.com"})
            for _ in range(5)
        )
    )

    assert [response.status_code for response in responses] == [202] * 5
    assert len(await fetch_outbox(client.app)) == before + 5


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"email": ""},
        {"email": "not-an-address"},
        {"email": 7},
        {"email": "alice@example.com", "password": "x"},
    ],
)
async def test_reset_request_invalid_body(
    client: QuartClient, relay: Relay, body: dict[str, object]
) -> None:
    response = await client.post("/api/password-resets", json=body)

    assert response.status_code == 422
    assert (await response.get_json())["error"] == "validation_failed"


async def test_reset_request_wrong_content_type(
    client: QuartClient, relay: Relay
) -> None:
    response = await client.post(
        "/api/password-resets", form={"email": "alice@example.com"}
    )

    assert response.status_code == 415
    assert (await response.get_json())["error"] == "unsupported_media_type"


async def test_reset_sets_new_password(client: QuartClient, relay: Relay) -> None:
    await signup(client, relay)
    token = await _requested_token(client, relay)

    response = await client.post(
        f"/api/password-resets/{token}", json={"password": NEW_PASSWORD}
    )

    old = await client.post(
        "/api/tokens", headers=basic_auth("alice@example.com", PASSWORD)
    )
    new = await client.post(
        "/api/tokens", headers=basic_auth("alice@example.com", NEW_PASSWORD)
    )
    assert response.status_code == 204
    assert await response.get_data() == b""
    assert old.status_code == 401
    assert new.status_code == 200


async def test_reset_revokes_bearer_tokens(client: QuartClient, relay: Relay) -> None:
    await signup(client, relay)
    bearer_token = await get_token(client)
    reset_token = await _requested_token(client, relay)

    await client.post(
        f"/api/password-resets/{reset_token}", json={"password": NEW_PASSWORD}
    )
    response = await client.get("/api/users/me", headers=bearer(bearer_token))

    body = await response.get_json()
    assert response.status_code == 401
    assert body["error"] == "invalid_token"
    assert "password changed" in body["detail"]


async def test_reset_confirms_account(client: QuartClient, relay: Relay) -> None:
    await signup(client, relay, confirm=False)
    token = await _requested_token(client, relay)

    await client.post(f"/api/password-resets/{token}", json={"password": NEW_PASSWORD})

    [user] = await fetch_users(client.app)
    assert user.confirmed


async def test_reset_token_works_once(client: QuartClient, relay: Relay) -> None:
    await signup(client, relay)
    token = await _requested_token(client, relay)

    first = await client.post(
        f"/api/password-resets/{token}", json={"password": NEW_PASSWORD}
    )
    second = await client.post(
        f"/api/password-resets/{token}", json={"password": "yet another password"}
    )

    assert first.status_code == 204
    assert second.status_code == 400
    assert (await second.get_json())["error"] == "invalid_token"


async def test_reset_bad_token_rejected(client: QuartClient, relay: Relay) -> None:
    await signup(client, relay)
    token = await _requested_token(client, relay)
    [user] = await fetch_users(client.app)
    async with client.app.app_context():
        confirmation = generate_token(
            Purpose.CONFIRM, {"confirm": user.id, "email": user.email}
        )
    bad_tokens = [
        token[:-2] + ("AA" if not token.endswith("AA") else "BB"),
        token + "x",
        "garbage",
        "a.b.c",
        confirmation,
        "x" * 5000,
    ]

    for bad in bad_tokens:
        response = await client.post(
            f"/api/password-resets/{bad}", json={"password": NEW_PASSWORD}
        )
        assert response.status_code == 400, bad
        assert (await response.get_json())["error"] == "invalid_token", bad
    still_valid = await client.post(
        "/api/tokens", headers=basic_auth("alice@example.com", PASSWORD)
    )
    assert still_valid.status_code == 200


async def test_reset_expired_token_rejected(client: QuartClient, relay: Relay) -> None:
    await signup(client, relay)
    [user] = await fetch_users(client.app)
    async with client.app.app_context():
        token = generate_token(
            Purpose.RESET_PASSWORD,
            {
                "reset": user.id,
                "email": user.email,
                "password": user.password_fingerprint,
            },
            issued_at=int(time.time()) - 7200,
        )

    response = await client.post(
        f"/api/password-resets/{token}", json={"password": NEW_PASSWORD}
    )

    body = await response.get_json()
    assert response.status_code == 400
    assert body["error"] == "token_expired"
    assert "POST /api/password-resets" in body["detail"]


@pytest.mark.parametrize(
    "body",
    [{}, {"password": "short"}, {"password": "x" * 129}, {"password": None}],
)
async def test_reset_invalid_password_keeps_token(
    client: QuartClient, relay: Relay, body: dict[str, object]
) -> None:
    await signup(client, relay)
    token = await _requested_token(client, relay)

    rejected = await client.post(f"/api/password-resets/{token}", json=body)
    accepted = await client.post(
        f"/api/password-resets/{token}", json={"password": NEW_PASSWORD}
    )

    assert rejected.status_code == 422
    assert (await rejected.get_json())["error"] == "validation_failed"
    assert accepted.status_code == 204


async def test_reset_malformed_json_rejected(client: QuartClient, relay: Relay) -> None:
    response = await client.post(
        "/api/password-resets/sometoken",
        data='{"password": ',
        headers={"Content-Type": "application/json"},
    )

    assert response.status_code == 400
    assert (await response.get_json())["error"] == "invalid_json"
