"""Errors under /api are JSON with a code and a sentence, and HTML pages keep HTML."""

import pytest
from quart import Quart, Response
from quart.testing import QuartClient

from tests.conftest import Relay, register, serving


async def _error(response: Response) -> dict[str, str]:
    body: dict[str, str] = await response.get_json()
    return body


@pytest.mark.parametrize(
    "path", ["/api", "/api/", "/api/nope", "/api/users/me/nope", "/api/%00"]
)
async def test_unknown_api_path_json_404(client: QuartClient, path: str) -> None:
    response = await client.get(path)

    body = await _error(response)
    assert response.status_code == 404
    assert response.mimetype == "application/json"
    assert set(body) == {"error", "detail"}
    assert body["error"] == "not_found"
    assert "/openapi.json" in body["detail"]


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("GET", "/api/tokens", {"POST", "OPTIONS"}),
        ("DELETE", "/api/users/me", {"GET", "HEAD", "OPTIONS"}),
        ("PUT", "/api/outbox", {"GET", "HEAD", "OPTIONS"}),
    ],
)
async def test_wrong_api_method_json_405(
    client: QuartClient, method: str, path: str, allowed: set[str]
) -> None:
    response = await client.open(path, method=method)

    body = await _error(response)
    assert response.status_code == 405
    assert response.mimetype == "application/json"
    assert body["error"] == "method_not_allowed"
    assert method in body["detail"]
    assert {name.strip() for name in response.headers["Allow"].split(",")} == allowed


async def test_html_errors_stay_html(client: QuartClient) -> None:
    missing = await client.get("/nope")
    wrong_method = await client.delete("/auth/login")

    assert missing.status_code == 404
    assert missing.mimetype == "text/html"
    assert wrong_method.status_code == 405
    assert wrong_method.mimetype == "text/html"


async def test_api_server_error_json_500(app: Quart) -> None:
    async def fail() -> str:
        raise RuntimeError("boom")

    app.add_url_rule("/api/fail", "fail", fail)
    async with serving(app) as client:
        response = await client.get("/api/fail")

    body = await _error(response)
    assert response.status_code == 500
    assert response.mimetype == "application/json"
    assert body["error"] == "internal_server_error"
    assert "boom" not in body["detail"]


async def test_unconfirmed_cookie_not_redirected(
    client: QuartClient, relay: Relay
) -> None:
    # Registering logs the new, unconfirmed user in with a cookie, and HTML
    # pages then redirect to /auth/unconfirmed. The API ignores the cookie.
    assert (await register(client)).status_code == 302

    response = await client.get("/api/users/me")

    assert response.status_code == 401
    assert response.mimetype == "application/json"


@pytest.mark.parametrize(
    "path",
    [
        "/api/users",
        "/api/confirmations",
        "/api/password-resets",
        "/api/password-resets/some-token",
    ],
)
async def test_json_body_routes_reject_bad_bodies(
    client: QuartClient, path: str
) -> None:
    json_type = {"Content-Type": "application/json"}

    malformed = await client.post(path, data='{"a": ', headers=json_type)
    form = await client.post(path, form={"email": "alice@example.com"})
    not_object = await client.post(path, data="[]", headers=json_type)
    oversized = await client.post(path, data="x" * (1024 * 1024 + 1), headers=json_type)

    assert (malformed.status_code, (await _error(malformed))["error"]) == (
        400,
        "invalid_json",
    )
    assert (form.status_code, (await _error(form))["error"]) == (
        415,
        "unsupported_media_type",
    )
    assert (not_object.status_code, (await _error(not_object))["error"]) == (
        422,
        "validation_failed",
    )
    assert (oversized.status_code, (await _error(oversized))["error"]) == (
        413,
        "payload_too_large",
    )
