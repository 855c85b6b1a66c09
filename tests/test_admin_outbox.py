"""The administrator's outbox page at /admin/outbox."""

import re

import pytest
from quart.testing import QuartClient

from tests.api import queue_emails, signup
from tests.conftest import (
    ADMIN_EMAIL,
    Relay,
    csrf_token,
    fetch_outbox,
    login,
    next_message_about,
    page_text,
    register,
)

REJECTED = "550 5.7.1 Message rejected"
RETRY_BUTTON = '<button class="button small" type="submit">Retry</button>'


async def _log_in_admin(client: QuartClient, relay: Relay) -> None:
    await signup(client, relay, email=ADMIN_EMAIL, username="boss")
    assert (await login(client, email=ADMIN_EMAIL)).status_code == 302


def _row_ids(page: str) -> list[int]:
    return [int(number) for number in re.findall(r'<tr id="message-(\d+)">', page)]


async def test_outbox_page_anonymous_to_login(client: QuartClient) -> None:
    response = await client.get("/admin/outbox?status=failed")

    assert response.status_code == 302
    assert response.headers["Location"] == (
        "/auth/login?next=/admin/outbox?status%3Dfailed"
    )


async def test_retry_anonymous_to_login_then_page(client: QuartClient) -> None:
    # The login sends the browser to `next` with a GET, for which the retry
    # route would return 405.
    response = await client.post("/admin/outbox/1/retry")

    assert response.status_code == 302
    assert response.headers["Location"] == "/auth/login?next=/admin/outbox"


async def test_outbox_page_user_forbidden(client: QuartClient, relay: Relay) -> None:
    await signup(client, relay)
    await login(client)

    response = await client.get("/admin/outbox")

    assert response.status_code == 403
    assert response.mimetype == "text/html"
    assert "Only an administrator may open this page." in await page_text(response)


async def test_outbox_page_unconfirmed_admin_redirected(
    client: QuartClient, relay: Relay
) -> None:
    # Registering logs the new account in, still unconfirmed.
    await register(client, email=ADMIN_EMAIL, username="boss")

    response = await client.get("/admin/outbox")

    assert response.status_code == 302
    assert response.headers["Location"] == "/auth/unconfirmed"


async def test_outbox_page_lists_messages(client: QuartClient, relay: Relay) -> None:
    await _log_in_admin(client, relay)
    failed = await queue_emails(client.app, relay, 2, reply=REJECTED)
    sent = await queue_emails(client.app, relay, 1)

    response = await client.get("/admin/outbox")

    page = await page_text(response)
    assert response.status_code == 200
    assert _row_ids(page) == [*sent, *failed[::-1], 2, 1]
    assert page.count(RETRY_BUTTON) == 2
    assert page.count(REJECTED) == 2
    assert "reader0@example.com" in page
    assert "Page 1 of 1 (5 messages)" in page


async def test_outbox_page_filters_status(client: QuartClient, relay: Relay) -> None:
    await _log_in_admin(client, relay)
    failed = await queue_emails(client.app, relay, 2, reply=REJECTED)
    await queue_emails(client.app, relay, 1)

    response = await client.get("/admin/outbox?status=failed")

    page = await page_text(response)
    assert response.status_code == 200
    assert _row_ids(page) == failed[::-1]
    assert '<input type="hidden" name="status" value="failed">' in page


async def test_outbox_page_unknown_status(client: QuartClient, relay: Relay) -> None:
    await _log_in_admin(client, relay)

    response = await client.get("/admin/outbox?status=lost")

    assert response.status_code == 400
    assert "Unknown outbox status" in await page_text(response)


@pytest.mark.parametrize(
    ("query", "page_number", "row_count"),
    [
        ("", 1, 50),
        ("?page=1", 1, 50),
        ("?page=2", 2, 7),
        ("?page=99999999999999999999999", 2, 7),
        ("?page=0", 1, 50),
        ("?page=-3", 1, 50),
        ("?page=two", 1, 50),
    ],
)
async def test_outbox_page_paginates(
    client: QuartClient, relay: Relay, query: str, page_number: int, row_count: int
) -> None:
    await _log_in_admin(client, relay)
    await queue_emails(client.app, relay, 55)

    response = await client.get(f"/admin/outbox{query}")

    page = await page_text(response)
    assert response.status_code == 200
    assert len(_row_ids(page)) == row_count
    assert f"Page {page_number} of 2 (57 messages)" in page


async def test_outbox_page_links_next_page(client: QuartClient, relay: Relay) -> None:
    await _log_in_admin(client, relay)
    await queue_emails(client.app, relay, 55)

    first = await page_text(await client.get("/admin/outbox"))
    second = await page_text(await client.get("/admin/outbox?page=2"))

    assert 'href="/admin/outbox?page=2" rel="next"' in first
    assert 'href="/admin/outbox?page=1" rel="prev"' in second
    assert set(_row_ids(first)).isdisjoint(_row_ids(second))


async def test_retry_button_sends_again(client: QuartClient, relay: Relay) -> None:
    await _log_in_admin(client, relay)
    [message_id] = await queue_emails(client.app, relay, 1, reply=REJECTED)
    token = await csrf_token(client, "/admin/outbox?status=failed")

    response = await client.post(
        f"/admin/outbox/{message_id}/retry",
        form={"csrf_token": token, "status": "failed"},
    )

    delivered = await next_message_about(relay, "Notice 0")
    after = await page_text(await client.get(response.headers["Location"]))
    assert response.status_code == 302
    assert response.headers["Location"] == "/admin/outbox?status=failed"
    assert delivered["To"] == "reader0@example.com"
    assert f"Outbox message {message_id} is being sent again." in after


@pytest.mark.parametrize("token", [None, "", "forged-token"])
async def test_retry_without_csrf_rejected(
    client: QuartClient, relay: Relay, token: str | None
) -> None:
    await _log_in_admin(client, relay)
    [message_id] = await queue_emails(client.app, relay, 1, reply=REJECTED)
    form = {} if token is None else {"csrf_token": token}

    response = await client.post(f"/admin/outbox/{message_id}/retry", form=form)

    rows = {row.id: row for row in await fetch_outbox(client.app)}
    assert response.status_code == 400
    assert "security token" in await page_text(response)
    assert rows[message_id].status == "failed"


async def test_retry_sent_message_explained(client: QuartClient, relay: Relay) -> None:
    await _log_in_admin(client, relay)
    [message_id] = await queue_emails(client.app, relay, 1)
    token = await csrf_token(client, "/auth/login")

    response = await client.post(
        f"/admin/outbox/{message_id}/retry", form={"csrf_token": token}
    )

    after = await page_text(await client.get(response.headers["Location"]))
    assert response.status_code == 302
    assert f"Outbox message {message_id} is sent, not failed" in after


async def test_retry_unknown_message_not_found(
    client: QuartClient, relay: Relay
) -> None:
    await _log_in_admin(client, relay)
    token = await csrf_token(client, "/auth/login")

    response = await client.post("/admin/outbox/4242/retry", form={"csrf_token": token})

    assert response.status_code == 404
    assert "Outbox message 4242 does not exist." in await page_text(response)


async def test_retry_by_user_forbidden(client: QuartClient, relay: Relay) -> None:
    await signup(client, relay)
    await login(client)
    token = await csrf_token(client, "/auth/login")

    response = await client.post("/admin/outbox/1/retry", form={"csrf_token": token})

    assert response.status_code == 403


async def test_nav_outbox_link_admins_only(client: QuartClient, relay: Relay) -> None:
    link = '<a href="/admin/outbox">Outbox</a>'
    await signup(client, relay)
    await login(client)
    user_home = await page_text(await client.get("/"))
    await client.get("/auth/logout")
    await _log_in_admin(client, relay)
    admin_home = await page_text(await client.get("/"))

    assert link not in user_home
    assert link in admin_home
