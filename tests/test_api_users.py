import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from pydantic import ValidationError
from quart import Quart
from quart.testing import QuartClient
from werkzeug.datastructures import MultiDict

from quart_app.api.schemas import SignupRequest
from quart_app.auth.forms import RegistrationForm
from quart_app.tokens import Purpose, generate_token
from tests.api import (
    CONFIRM_SUBJECT,
    api_signup,
    bearer,
    get_token,
    link_token,
    signup,
)
from tests.conftest import (
    PASSWORD,
    Relay,
    confirm_link,
    fetch_outbox,
    fetch_users,
    make_app,
    next_message_about,
    page_text,
    serving,
)

# Each value breaks one rule of the signup form, and the rest of the body is valid.
INVALID_FIELDS = [
    ("email", None),
    ("email", 123),
    ("email", ["alice@example.com"]),
    ("email", ""),
    ("email", "not-an-address"),
    ("email", "alice@"),
    ("email", "jos\u00e9@example.com"),
    ("email", "alice@example.com\r\nBcc: victim@example.com"),
    ("email", "a" * 250 + "@example.com"),
    ("username", None),
    ("username", 42),
    ("username", ""),
    ("username", "1alice"),
    ("username", "al ice"),
    ("username", "alice!"),
    ("username", "alice\n"),
    ("username", "a" * 65),
    ("password", None),
    ("password", True),
    ("password", "short"),
    ("password", "x" * 129),
]


# Values both the form and the API accept.
VALID_FIELDS = [
    ("email", " bob@example.com "),
    ("email", "carol@B\u00fccher.example"),
    ("username", "A"),
    ("username", "a.b_c9"),
    ("password", "x" * 8),
    ("password", "x" * 128),
]


@pytest.mark.parametrize(
    ("field", "value"),
    [case for case in INVALID_FIELDS if isinstance(case[1], str)] + VALID_FIELDS,
)
def test_signup_rules_match_form(field: str, value: str) -> None:
    body = {"email": "alice@example.com", "username": "alice", "password": PASSWORD}
    body[field] = value
    form = RegistrationForm(
        formdata=MultiDict(body | {"password2": body["password"]}),
        meta={"csrf": False},
    )
    try:
        SignupRequest.model_validate(body)
    except ValidationError:
        api_accepts = False
    else:
        api_accepts = True

    assert form.validate() == api_accepts


async def test_signup_creates_unconfirmed_user(
    client: QuartClient, relay: Relay
) -> None:
    response = await api_signup(client, email=" Alice@Example.COM ")

    body = await response.get_json()
    [user] = await fetch_users(client.app)
    assert response.status_code == 201
    assert body == {
        "id": user.id,
        "email": "alice@example.com",
        "username": "alice",
        "confirmed": False,
    }
    assert user.email == "alice@example.com"
    assert not user.confirmed


async def test_signup_email_link_confirms(client: QuartClient, relay: Relay) -> None:
    await api_signup(client)
    message = await next_message_about(relay, CONFIRM_SUBJECT)

    page = await client.get(urlsplit(confirm_link(message)).path)

    [user] = await fetch_users(client.app)
    assert message["To"] == "alice@example.com"
    assert page.status_code == 200
    assert "Account confirmed" in await page_text(page)
    assert user.confirmed


async def test_signup_sends_admin_notice(client: QuartClient, relay: Relay) -> None:
    await api_signup(client)

    notice = await next_message_about(relay, "New User")

    assert notice["To"] == "admin@example.com"


@pytest.mark.parametrize(
    ("email", "username", "error"),
    [
        ("ALICE@example.com", "alice2", "duplicate_email"),
        (" alice@example.com ", "alice3", "duplicate_email"),
        ("other@example.com", "ALICE", "duplicate_username"),
    ],
)
async def test_signup_duplicate_conflict(
    app: Quart, relay: Relay, email: str, username: str, error: str
) -> None:
    async with serving(app) as client:
        assert (await api_signup(client)).status_code == 201
        response = await api_signup(client, email=email, username=username)

    body = await response.get_json()
    assert response.status_code == 409
    assert body["error"] == error
    assert len(await fetch_users(app)) == 1
    # Only the first signup's confirmation and notice were queued.
    assert len(await fetch_outbox(app)) == 2


@pytest.mark.parametrize(("field", "value"), INVALID_FIELDS)
async def test_signup_invalid_field_rejected(
    client: QuartClient, relay: Relay, field: str, value: object
) -> None:
    body = {"email": "alice@example.com", "username": "alice", "password": PASSWORD}
    body[field] = value  # type: ignore[assignment]

    response = await client.post("/api/users", json=body)

    error = await response.get_json()
    assert response.status_code == 422
    assert error["error"] == "validation_failed"
    assert error["detail"].startswith(f"Invalid request body: {field}: ")
    assert await fetch_users(client.app) == []


@pytest.mark.parametrize("missing", ["email", "username", "password"])
async def test_signup_missing_field_rejected(
    client: QuartClient, relay: Relay, missing: str
) -> None:
    body = {"email": "alice@example.com", "username": "alice", "password": PASSWORD}
    del body[missing]

    response = await client.post("/api/users", json=body)

    error = await response.get_json()
    assert response.status_code == 422
    assert error["detail"] == f"Invalid request body: {missing}: Field required."


@pytest.mark.parametrize(
    "extra", [{"role": "Administrator"}, {"confirmed": True}, {"x": "a" * 500_000}]
)
async def test_signup_extra_field_rejected(
    client: QuartClient, relay: Relay, extra: dict[str, object]
) -> None:
    body = {"email": "alice@example.com", "username": "alice", "password": PASSWORD}

    response = await client.post("/api/users", json=body | extra)

    error = await response.get_json()
    [name] = extra
    assert response.status_code == 422
    assert f"{name}: Extra inputs are not permitted" in error["detail"]
    assert len(error["detail"]) < 200
    assert await fetch_users(client.app) == []


async def test_signup_password_not_echoed(client: QuartClient, relay: Relay) -> None:
    secret = "my secret " * 20

    response = await api_signup(client, password=secret)

    assert response.status_code == 422
    assert secret not in await response.get_data(as_text=True)


@pytest.mark.parametrize("body", ["[]", '"alice"', "123", "null", "true"])
async def test_signup_non_object_rejected(
    client: QuartClient, relay: Relay, body: str
) -> None:
    response = await client.post(
        "/api/users", data=body, headers={"Content-Type": "application/json"}
    )

    error = await response.get_json()
    assert response.status_code == 422
    assert error == {
        "error": "validation_failed",
        "detail": "The request body must be a JSON object.",
    }


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b'{"email": ',
        b"{'email': 'alice@example.com'}",
        b'{"email": "alice@example.com",}',
        b"\xff\xfe{}",
        b"[" * 100_000,
        b'{"a":' * 100_000,
    ],
)
async def test_signup_malformed_json_rejected(
    client: QuartClient, relay: Relay, body: bytes
) -> None:
    response = await client.post(
        "/api/users", data=body, headers={"Content-Type": "application/json"}
    )

    error = await response.get_json()
    assert response.status_code == 400
    assert error["error"] == "invalid_json"


@pytest.mark.parametrize(
    "content_type",
    [None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data"],
)
async def test_signup_wrong_content_type_rejected(
    client: QuartClient, relay: Relay, content_type: str | None
) -> None:
    headers = {} if content_type is None else {"Content-Type": content_type}
    body = '{"email": "alice@example.com", "username": "alice", "password": "x"}'

    response = await client.post("/api/users", data=body, headers=headers)

    error = await response.get_json()
    assert response.status_code == 415
    assert error["error"] == "unsupported_media_type"
    assert "application/json" in error["detail"]


async def test_signup_oversized_body_rejected(
    client: QuartClient, relay: Relay
) -> None:
    padding = "a" * (1024 * 1024)
    body = f'{{"email": "alice@example.com", "x": "{padding}"}}'

    response = await client.post(
        "/api/users", data=body, headers={"Content-Type": "application/json"}
    )

    error = await response.get_json()
    assert response.status_code == 413
    assert error["error"] == "payload_too_large"
    assert "1048576 bytes" in error["detail"]


async def test_confirmation_confirms_account(client: QuartClient, relay: Relay) -> None:
    await api_signup(client)
    token = link_token(await next_message_about(relay, CONFIRM_SUBJECT))

    response = await client.post("/api/confirmations", json={"token": token})

    body = await response.get_json()
    [user] = await fetch_users(client.app)
    assert response.status_code == 200
    assert body["confirmed"] is True
    assert body["id"] == user.id
    assert user.confirmed


async def test_confirmation_twice_still_ok(client: QuartClient, relay: Relay) -> None:
    await api_signup(client)
    token = link_token(await next_message_about(relay, CONFIRM_SUBJECT))

    first = await client.post("/api/confirmations", json={"token": token})
    second = await client.post("/api/confirmations", json={"token": token})

    assert first.status_code == 200
    assert second.status_code == 200
    assert (await second.get_json())["confirmed"] is True


async def test_confirmation_bad_token_rejected(
    client: QuartClient, relay: Relay
) -> None:
    await api_signup(client)
    token = link_token(await next_message_about(relay, CONFIRM_SUBJECT))
    [user] = await fetch_users(client.app)
    async with client.app.app_context():
        payload = {"confirm": user.id, "email": user.email}
        other_purpose = generate_token(Purpose.RESET_PASSWORD, payload)
        wrong_user = generate_token(Purpose.CONFIRM, {"confirm": 999, "email": "x@y.z"})
    bad_tokens = [
        token[:-2] + ("AA" if not token.endswith("AA") else "BB"),
        token + "x",
        "garbage",
        "a.b.c",
        other_purpose,
        wrong_user,
    ]

    for bad in bad_tokens:
        response = await client.post("/api/confirmations", json={"token": bad})
        assert response.status_code == 400, bad
        assert (await response.get_json())["error"] == "invalid_token", bad
    [user] = await fetch_users(client.app)
    assert not user.confirmed


async def test_confirmation_expired_token_rejected(
    client: QuartClient, relay: Relay
) -> None:
    await api_signup(client)
    [user] = await fetch_users(client.app)
    async with client.app.app_context():
        token = generate_token(
            Purpose.CONFIRM,
            {"confirm": user.id, "email": user.email},
            issued_at=int(time.time()) - 7200,
        )

    response = await client.post("/api/confirmations", json={"token": token})

    body = await response.get_json()
    assert response.status_code == 400
    assert body["error"] == "token_expired"
    assert "/api/users/me/confirmation" in body["detail"]


@pytest.mark.parametrize(
    "body", [{}, {"token": ""}, {"token": 5}, {"token": "x" * 1001}, {"tok": "x"}]
)
async def test_confirmation_invalid_body_rejected(
    client: QuartClient, relay: Relay, body: dict[str, object]
) -> None:
    response = await client.post("/api/confirmations", json=body)

    assert response.status_code == 422
    assert (await response.get_json())["error"] == "validation_failed"


async def test_resend_sends_new_link(client: QuartClient, relay: Relay) -> None:
    await signup(client, relay, confirm=False)
    token = await get_token(client)

    response = await client.post("/api/users/me/confirmation", headers=bearer(token))

    body = await response.get_json()
    message = await next_message_about(relay, CONFIRM_SUBJECT)
    assert response.status_code == 202
    assert "alice@example.com" in body["detail"]
    assert message["To"] == "alice@example.com"


async def test_resend_too_soon_rate_limited(
    database_url: str, relay: Relay, tmp_path: Path
) -> None:
    app = make_app(database_url, relay.port, tmp_path, CONFIRMATION_RESEND_INTERVAL=60)
    async with serving(app) as client:
        await signup(client, relay, confirm=False)
        token = await get_token(client)
        response = await client.post(
            "/api/users/me/confirmation", headers=bearer(token)
        )

    body = await response.get_json()
    retry_after = int(response.headers["Retry-After"])
    assert response.status_code == 429
    assert body["error"] == "rate_limited"
    assert 0 < retry_after <= 60
    assert f"{retry_after} seconds" in body["detail"]
    # Only the signup's confirmation and notice were queued.
    assert len(await fetch_outbox(app)) == 2


async def test_resend_confirmed_conflict(client: QuartClient, relay: Relay) -> None:
    await signup(client, relay)
    token = await get_token(client)

    response = await client.post("/api/users/me/confirmation", headers=bearer(token))

    assert response.status_code == 409
    assert (await response.get_json())["error"] == "already_confirmed"


async def test_resend_without_token_unauthorized(
    client: QuartClient, relay: Relay
) -> None:
    response = await client.post("/api/users/me/confirmation")

    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="api"'
