import pytest
from quart import Quart
from quart.testing import QuartClient

from tests.api import (
    admin_token,
    bearer,
    get_token,
    queue_emails,
    signup,
)
from tests.conftest import ADMIN_EMAIL, Relay, fetch_outbox, next_message_about, serving

REJECTED = "550 5.7.1 Message rejected"
FIELDS = {
    "id",
    "to",
    "subject",
    "status",
    "attempts",
    "last_error",
    "next_attempt_at",
}


async def test_outbox_lists_newest_first(client: QuartClient, relay: Relay) -> None:
    token = await admin_token(client, relay)
    await queue_emails(client.app, relay, 2)

    response = await client.get("/api/outbox", headers=bearer(token))

    messages = await response.get_json()
    ids = [message["id"] for message in messages]
    assert response.status_code == 200
    assert ids == [4, 3, 2, 1]
    assert all(set(message) == FIELDS for message in messages)
    assert messages[0]["to"] == "reader1@example.com"
    assert messages[0]["subject"] == "Notice 1"
    assert messages[0]["status"] == "sent"
    assert messages[0]["attempts"] == 1
    assert messages[0]["last_error"] is None
    assert messages[0]["next_attempt_at"].endswith("Z")
    assert "Link" not in response.headers


async def test_outbox_filters_by_status(client: QuartClient, relay: Relay) -> None:
    token = await admin_token(client, relay)
    failed = await queue_emails(client.app, relay, 2, reply=REJECTED)
    await queue_emails(client.app, relay, 1)

    response = await client.get("/api/outbox?status=failed", headers=bearer(token))

    messages = await response.get_json()
    assert response.status_code == 200
    assert [message["id"] for message in messages] == failed[::-1]
    assert {message["status"] for message in messages} == {"failed"}
    assert all(REJECTED in message["last_error"] for message in messages)


async def test_outbox_pages_follow_link(client: QuartClient, relay: Relay) -> None:
    token = await admin_token(client, relay)
    await queue_emails(client.app, relay, 5)

    seen: list[int] = []
    path: str | None = "/api/outbox?limit=3&status=sent"
    pages = 0
    while path is not None:
        response = await client.get(path, headers=bearer(token))
        assert response.status_code == 200
        seen += [message["id"] for message in await response.get_json()]
        link = response.headers.get("Link")
        path = link[1 : link.index(">")] if link else None
        pages += 1

    assert seen == [7, 6, 5, 4, 3, 2, 1]
    assert pages == 3


@pytest.mark.parametrize(
    "query",
    [
        "status=bogus",
        "status=",
        "status=FAILED",
        "status=failed&status=sent",
        "limit=0",
        "limit=201",
        "limit=ten",
        "before=0",
        "before=99999999999",
        "color=red",
    ],
)
async def test_outbox_bad_query_rejected(
    client: QuartClient, relay: Relay, query: str
) -> None:
    token = await admin_token(client, relay)

    response = await client.get(f"/api/outbox?{query}", headers=bearer(token))

    body = await response.get_json()
    assert response.status_code == 400
    assert body["error"] == "invalid_query"
    assert body["detail"].startswith("Invalid query string: ")


async def test_outbox_user_forbidden(client: QuartClient, relay: Relay) -> None:
    await signup(client, relay)
    token = await get_token(client)

    listing = await client.get("/api/outbox", headers=bearer(token))
    retry = await client.post("/api/outbox/1/retry", headers=bearer(token))

    assert listing.status_code == 403
    assert (await listing.get_json())["error"] == "forbidden"
    assert retry.status_code == 403
    assert (await retry.get_json())["error"] == "forbidden"


async def test_outbox_unconfirmed_admin_forbidden(
    client: QuartClient, relay: Relay
) -> None:
    await signup(client, relay, email=ADMIN_EMAIL, username="boss", confirm=False)
    token = await get_token(client, email=ADMIN_EMAIL)

    response = await client.get("/api/outbox", headers=bearer(token))

    body = await response.get_json()
    assert response.status_code == 403
    assert body["error"] == "unconfirmed"
    assert "/api/users/me/confirmation" in body["detail"]


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/api/outbox"),
        ("GET", "/api/outbox?status=bogus"),
        ("POST", "/api/outbox/1/retry"),
    ],
)
async def test_outbox_without_token_unauthorized(
    client: QuartClient, relay: Relay, method: str, path: str
) -> None:
    response = await client.open(path, method=method)

    assert response.status_code == 401
    assert (await response.get_json())["error"] == "unauthorized"


async def test_retry_sends_failed_message(client: QuartClient, relay: Relay) -> None:
    token = await admin_token(client, relay)
    [message_id] = await queue_emails(client.app, relay, 1, reply=REJECTED)

    response = await client.post(
        f"/api/outbox/{message_id}/retry", headers=bearer(token)
    )

    body = await response.get_json()
    assert response.status_code == 202
    assert body["id"] == message_id
    assert body["status"] == "pending"
    assert body["attempts"] == 0
    delivered = await next_message_about(relay, "Notice 0")
    assert delivered["To"] == "reader0@example.com"


async def test_retry_row_sent_after_retry(app: Quart, relay: Relay) -> None:
    async with serving(app) as client:
        token = await admin_token(client, relay)
        [message_id] = await queue_emails(app, relay, 1, reply=REJECTED)
        await client.post(f"/api/outbox/{message_id}/retry", headers=bearer(token))
    # Leaving serving() waited for the send and the record of its outcome.

    rows = {row.id: row for row in await fetch_outbox(app)}
    assert rows[message_id].status == "sent"
    assert rows[message_id].attempts == 1


@pytest.mark.parametrize(
    "path",
    [
        "/api/outbox/999/retry",
        "/api/outbox/0/retry",
        "/api/outbox/-1/retry",
        "/api/outbox/99999999999/retry",
        "/api/outbox/abc/retry",
        "/api/outbox//retry",
    ],
)
async def test_retry_unknown_id_not_found(
    client: QuartClient, relay: Relay, path: str
) -> None:
    token = await admin_token(client, relay)

    response = await client.post(path, headers=bearer(token))

    assert response.status_code == 404
    assert (await response.get_json())["error"] == "not_found"


@pytest.mark.parametrize("message_id", [0, 2**31, 99999999999])
async def test_retry_id_out_of_range_explained(
    client: QuartClient, relay: Relay, message_id: int
) -> None:
    token = await admin_token(client, relay)

    response = await client.post(
        f"/api/outbox/{message_id}/retry", headers=bearer(token)
    )

    body = await response.get_json()
    assert response.status_code == 404
    assert "the range of each id in a path" in body["detail"]


async def test_retry_sent_message_conflict(client: QuartClient, relay: Relay) -> None:
    token = await admin_token(client, relay)
    [message_id] = await queue_emails(client.app, relay, 1)

    response = await client.post(
        f"/api/outbox/{message_id}/retry", headers=bearer(token)
    )

    body = await response.get_json()
    assert response.status_code == 409
    assert body["error"] == "not_failed"
    assert "is sent, not failed" in body["detail"]


async def test_retry_wrong_method_not_allowed(
    client: QuartClient, relay: Relay
) -> None:
    token = await admin_token(client, relay)

    response = await client.get("/api/outbox/1/retry", headers=bearer(token))

    assert response.status_code == 405
    assert (await response.get_json())["error"] == "method_not_allowed"
    allowed = {method.strip() for method in response.headers["Allow"].split(",")}
    assert allowed == {"OPTIONS", "POST"}
