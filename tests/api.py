"""Helpers for the JSON API tests: credentials, accounts and tokens."""

import asyncio
import base64
from email.message import EmailMessage
from typing import Any
from urllib.parse import urlsplit

from quart import Quart
from quart.testing import QuartClient

from quart_app.db import get_session
from quart_app.outbox import enqueue
from tests.conftest import (
    ADMIN_EMAIL,
    PASSWORD,
    Relay,
    confirm_link,
    next_message_about,
    register,
)

CONFIRM_SUBJECT = "Confirm Your Account"


def basic_auth(email: str, password: str) -> dict[str, str]:
    credentials = base64.b64encode(f"{email}:{password}".encode()).decode()
    return {"Authorization": f"Basic {credentials}"}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def signup(
    client: QuartClient,
    relay: Relay,
    *,
    email: str = "alice@example.com",
    username: str = "alice",
    confirm: bool = True,
) -> None:
    """Sign up through the HTML form, confirm if asked, and log out again.

    Logging out leaves the client without a login cookie, so its API requests
    carry only the credentials that the test sends.
    """
    response = await register(client, email=email, username=username)
    assert response.status_code == 302, await response.get_data(as_text=True)
    link = confirm_link(await next_message_about(relay, CONFIRM_SUBJECT))
    if confirm:
        assert (await client.get(urlsplit(link).path)).status_code == 200
    await client.get("/auth/logout")


async def get_token(
    client: QuartClient, *, email: str = "alice@example.com", password: str = PASSWORD
) -> str:
    response = await client.post("/api/tokens", headers=basic_auth(email, password))
    assert response.status_code == 200, await response.get_data(as_text=True)
    body: dict[str, Any] = await response.get_json()
    token: str = body["token"]
    return token


async def admin_token(client: QuartClient, relay: Relay) -> str:
    """Sign up and confirm the APP_ADMIN account, and return a token for it."""
    await signup(client, relay, email=ADMIN_EMAIL, username="boss")
    return await get_token(client, email=ADMIN_EMAIL)


async def queue_emails(
    app: Quart, relay: Relay, count: int, *, reply: str | None = None
) -> list[int]:
    """Queue `count` emails in the serving app's outbox and wait for their sends.

    With `reply`, such as "550 5.7.1 Rejected", the relay rejects them, so a
    5xx reply leaves them failed. Returns their outbox ids, oldest first.
    """
    relay.reply = reply
    async with app.app_context():
        session = get_session()
        rows = []
        for number in range(count):
            message = EmailMessage()
            message["From"] = "Quart App <noreply@app.test>"
            message["To"] = f"reader{number}@example.com"
            message["Subject"] = f"Notice {number}"
            message.set_content(f"Body {number}")
            rows.append(await enqueue(message, session=session))
        running = set(app.background_tasks)
        await session.commit()
    # The commit started a background task that sends these rows. The delivery
    # loop is a background task too, and runs until shutdown, so it is left out.
    await asyncio.gather(*(app.background_tasks - running))
    relay.reply = None
    return [row.id for row in rows]


async def api_signup(
    client: QuartClient,
    *,
    email: str = "alice@example.com",
    username: str = "alice",
    password: str = PASSWORD,
) -> Any:
    return await client.post(
        "/api/users",
        json={"email": email, "username": username, "password": password},
    )


def link_token(message: EmailMessage) -> str:
    """Return the token at the end of the confirmation link in `message`."""
    return urlsplit(confirm_link(message)).path.rsplit("/", 1)[1]
