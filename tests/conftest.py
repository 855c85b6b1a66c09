"""Shared fixtures: a real aiosmtpd relay, a real database and the app under test.

The relay runs aiosmtpd's SMTP protocol on the test's own event loop, bound to
127.0.0.1 on a free port. Tests steer it through `Relay`: hold DATA until an event
is set, reply with a chosen code, or drop the connection.
"""

import asyncio
import gc
import os
import re
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session
from quart import Quart
from quart.testing import QuartClient
from sqlalchemy import select
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncSession

from quart_app import create_app
from quart_app.config import Settings
from quart_app.db import Base, create_engine
from quart_app.models import OutboxMessage, User

DEFAULT_TEST_DATABASE_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
BASE_URL = "http://app.test"
ADMIN_EMAIL = "admin@example.com"
PASSWORD = "correct horse battery"


@dataclass
class Relay:
    """A recording SMTP relay whose behaviour a test can change between messages."""

    host: str = "127.0.0.1"
    port: int = 0
    messages: list[EmailMessage] = field(default_factory=list)
    envelopes: list[Envelope] = field(default_factory=list)
    queue: asyncio.Queue[EmailMessage] = field(default_factory=asyncio.Queue)
    # When set, DATA waits for `release` before it replies.
    hold: bool = False
    release: asyncio.Event = field(default_factory=asyncio.Event)
    data_started: asyncio.Event = field(default_factory=asyncio.Event)
    # A full reply line such as "451 4.3.0 Try again later" replaces the 250.
    reply: str | None = None
    # Replies for the next messages, one each, before `reply` applies again; None
    # in the list accepts that message.
    replies: list[str | None] = field(default_factory=list)
    # Close the connection at DATA without replying.
    drop: bool = False
    # Addresses refused at RCPT TO with 550.
    refused_recipients: set[str] = field(default_factory=set)
    # The client address and port of each accepted message, one per connection.
    peers: list[tuple[str, int]] = field(default_factory=list)

    async def next_message(self, within: float = 10.0) -> EmailMessage:
        """Wait up to `within` seconds for the next accepted message."""
        return await asyncio.wait_for(self.queue.get(), within)

    async def handle_RCPT(  # noqa: N802 - the name aiosmtpd calls
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        if address in self.refused_recipients:
            return "550 5.1.1 No such user"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(  # noqa: N802 - the name aiosmtpd calls
        self, server: SMTP, session: Session, envelope: Envelope
    ) -> str:
        self.data_started.set()
        if self.hold:
            await self.release.wait()
        if server.transport is None or server.transport.is_closing():
            # The client went away while DATA was held, so it never learns of
            # the message: record nothing, as no reply reaches it.
            return "421 4.4.2 Connection lost"
        if self.drop:
            server.transport.abort()
            return "421 4.4.2 Closing"
        reply = self.replies.pop(0) if self.replies else self.reply
        if reply is not None:
            return reply
        self.peers.append(session.peer)
        message = message_from_bytes(
            envelope.original_content or b"", policy=policy.default
        )
        assert isinstance(message, EmailMessage)
        self.messages.append(message)
        self.envelopes.append(envelope)
        self.queue.put_nowait(message)
        return "250 2.0.0 Queued"


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # Settings read the environment, so a variable from the shell running the
    # tests (say MAIL_SERVER) must not leak into an app built for a test.
    for name in Settings.model_fields:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(autouse=True, scope="session")
def _unfreeze_at_end() -> Iterator[None]:
    yield
    # pytest collects garbage once more when the run ends, and frozen objects
    # would escape that collection.
    gc.unfreeze()


@pytest.fixture(autouse=True)
def _collect_garbage(_unfreeze_at_end: None) -> Iterator[None]:
    # Freezing what is alive, mostly caches kept for the whole run, limits the
    # collection at teardown to what this test allocates. Collecting first keeps
    # the previous test's garbage out of the frozen set.
    gc.collect()
    gc.freeze()
    yield
    # A leaked connection warns when the garbage collector frees it, which may be
    # during a later test. Collecting here, after an async test's event loop has
    # closed, makes filterwarnings fail the test that leaked it. A leak reachable
    # only from the test's fixture values or captured log records is reported at
    # the next test's setup, because pytest frees those after teardown.
    gc.collect()


@pytest.fixture(name="relay")
async def _relay() -> AsyncIterator[Relay]:
    relay = Relay()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(relay, hostname="relay.test"), host="127.0.0.1", port=0
    )
    relay.port = server.sockets[0].getsockname()[1]
    yield relay
    relay.release.set()
    server.close()
    await server.wait_closed()


def free_port() -> int:
    """Return a loopback port that nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _postgres_url() -> str:
    return os.environ.get("TEST_DATABASE_URL", DEFAULT_TEST_DATABASE_URL)


async def _postgres_answers(url: str) -> str | None:
    parsed = make_url(url)
    try:
        connection = await asyncpg.connect(
            host=parsed.host,
            port=parsed.port or 5432,
            user=parsed.username,
            password=parsed.password,
            database=parsed.database,
            timeout=5,
        )
    except (OSError, asyncpg.PostgresError, TimeoutError) as error:
        return f"{type(error).__name__}: {error}"
    await connection.close()
    return None


@pytest.fixture(name="database_url", params=["sqlite", "postgresql"])
async def _database_url(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[str]:
    """A database with an empty schema: a SQLite file, or the test PostgreSQL."""
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'test.db'}"
    else:
        url = _postgres_url()
        problem = await _postgres_answers(url)
        if problem is not None:
            reason = (
                f"PostgreSQL at TEST_DATABASE_URL ({url}) did not answer: {problem}"
            )
            if os.environ.get("CI"):
                pytest.fail(f"{reason}. CI must run the PostgreSQL tests.")
            pytest.skip(reason)

    engine = create_engine(url)
    async with engine.begin() as connection:
        await connection.run_sync(Base.metadata.drop_all)
        await connection.run_sync(Base.metadata.create_all)
    yield url
    async with engine.begin() as connection:
        await connection.run_sync(Base.metadata.drop_all)
    await engine.dispose()


async def fetch_users(app: Quart) -> list[User]:
    """Read every user straight from the app's database, outside its lifespan."""
    engine = create_engine(app.config["DATABASE_URL"])
    try:
        async with AsyncSession(engine) as session:
            result = await session.execute(select(User).order_by(User.id))
            return list(result.scalars())
    finally:
        await engine.dispose()


async def fetch_outbox(app: Quart) -> list[OutboxMessage]:
    """Read every outbox row straight from the app's database, oldest first."""
    engine = create_engine(app.config["DATABASE_URL"])
    try:
        async with AsyncSession(engine) as session:
            result = await session.execute(
                select(OutboxMessage).order_by(OutboxMessage.id)
            )
            return list(result.scalars())
    finally:
        await engine.dispose()


def make_app(
    database_url: str, relay_port: int, tmp_path: Path, **overrides: Any
) -> Quart:
    settings: dict[str, Any] = {
        "APP_ENV": "testing",
        "DATABASE_URL": database_url,
        "INSTANCE_PATH": str(tmp_path / "instance"),
        "MAIL_SERVER": "127.0.0.1",
        "MAIL_PORT": relay_port,
        "MAIL_TIMEOUT": 5,
        "APP_BASE_URL": BASE_URL,
        "APP_ADMIN": ADMIN_EMAIL,
        "CONFIRMATION_RESEND_INTERVAL": 0,
        "PASSWORD_RESET_INTERVAL": 0,
        "EMAIL_CHANGE_INTERVAL": 0,
    }
    settings.update(overrides)
    return create_app(settings)


@pytest.fixture(name="app")
def _app(database_url: str, relay: Relay, tmp_path: Path) -> Iterator[Quart]:
    app = make_app(database_url, relay.port, tmp_path)
    yield app
    assert not app.background_tasks, "a test left background tasks running"


@asynccontextmanager
async def serving(app: Quart) -> AsyncIterator[QuartClient]:
    """Run the app's startup and shutdown around a test client.

    Leaving the block waits for the background tasks, so every email the app
    queued has reached the relay (or failed) by then.
    """
    async with app.test_app() as test_app:
        yield test_app.test_client()


@pytest.fixture(name="client")
async def _client(app: Quart) -> AsyncIterator[QuartClient]:
    async with serving(app) as client:
        yield client


_CSRF_PATTERN = re.compile(r'name="csrf_token" type="hidden" value="([^"]+)"')


async def csrf_token(client: QuartClient, path: str) -> str:
    response = await client.get(path)
    page = await response.get_data(as_text=True)
    match = _CSRF_PATTERN.search(page)
    assert match is not None, f"no csrf_token on {path}"
    return match.group(1)


async def register(
    client: QuartClient,
    *,
    email: str = "alice@example.com",
    username: str = "alice",
    password: str = PASSWORD,
    password2: str | None = None,
    headers: dict[str, str] | None = None,
) -> Any:
    token = await csrf_token(client, "/auth/register")
    return await client.post(
        "/auth/register",
        form={
            "csrf_token": token,
            "email": email,
            "username": username,
            "password": password,
            "password2": password if password2 is None else password2,
        },
        headers=headers,
    )


async def login(
    client: QuartClient,
    *,
    email: str = "alice@example.com",
    password: str = PASSWORD,
    remember_me: bool = False,
    next_path: str | None = None,
) -> Any:
    token = await csrf_token(client, "/auth/login")
    form = {"csrf_token": token, "email": email, "password": password}
    if remember_me:
        form["remember_me"] = "y"
    path = "/auth/login" if next_path is None else f"/auth/login?next={next_path}"
    return await client.post(path, form=form)


async def page_text(response: Any) -> str:
    return await response.get_data(as_text=True)


def parts_of(message: EmailMessage) -> tuple[str, str]:
    """Return the text/plain and text/html bodies of a multipart/alternative message."""
    text = message.get_body(preferencelist=("plain",))
    html = message.get_body(preferencelist=("html",))
    assert text is not None and html is not None
    return text.get_content(), html.get_content()


def confirm_link(message: EmailMessage) -> str:
    text, _ = parts_of(message)
    match = re.search(r"https?://\S+/auth/confirm/\S+", text)
    assert match is not None, text
    return match.group(0)


def link_to(message: EmailMessage, path: str) -> str:
    """Return the absolute link to a `path` such as "/auth/reset/" in the text part."""
    text, _ = parts_of(message)
    match = re.search(rf"https?://\S+{re.escape(path)}\S+", text)
    assert match is not None, text
    return match.group(0)


async def next_message_about(relay: Relay, subject: str) -> EmailMessage:
    """Wait for the next message whose subject contains `subject`, skipping others."""
    while True:
        message = await relay.next_message()
        if subject in message["Subject"]:
            return message


async def sign_up(client: QuartClient, relay: Relay, **fields: Any) -> None:
    """Register with `fields` and confirm, leaving the client logged in."""
    response = await register(client, **fields)
    assert response.status_code == 302
    message = await next_message_about(relay, "Confirm Your Account")
    confirmed = await client.get(urlsplit(confirm_link(message)).path)
    assert confirmed.status_code == 200
