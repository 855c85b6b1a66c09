import asyncio
import logging
import threading
from pathlib import Path

import pytest
from quart import Quart

from quart_app.db import get_session
from quart_app.email import send_email
from tests.conftest import (
    ADMIN_EMAIL,
    Relay,
    csrf_token,
    fetch_outbox,
    free_port,
    login,
    make_app,
    page_text,
    parts_of,
    register,
    serving,
)


def _delivery_logs(
    caplog: pytest.LogCaptureFixture, level: int
) -> list[logging.LogRecord]:
    return [
        record
        for record in caplog.records
        if record.name == "quart_app.outbox.delivery" and record.levelno == level
    ]


async def test_relay_permanent_refusal_logged(
    app: Quart, relay: Relay, caplog: pytest.LogCaptureFixture
) -> None:
    relay.reply = "550 5.7.1 Relaying denied"
    async with serving(app) as client:
        response = await register(client)
        assert response.status_code == 302
    errors = _delivery_logs(caplog, logging.ERROR)
    assert len(errors) == 2
    confirm_error = next(r for r in errors if "Confirm Your Account" in r.getMessage())
    assert "alice@example.com" in confirm_error.getMessage()
    assert "550 5.7.1 Relaying denied" in confirm_error.getMessage()
    assert relay.messages == []
    rows = await fetch_outbox(app)
    assert [row.status for row in rows] == ["failed", "failed"]
    assert all(row.last_error == "550 5.7.1 Relaying denied" for row in rows)

    # The app goes on serving, and once the relay accepts, resend works.
    relay.reply = None
    async with serving(app) as client:
        assert (await login(client)).status_code == 302
        token = await csrf_token(client, "/auth/unconfirmed")
        resent = await client.post("/auth/confirm", form={"csrf_token": token})
        assert resent.status_code == 302
        message = await relay.next_message()
    assert "Confirm Your Account" in message["Subject"]


async def test_relay_transient_refusal_logged(
    app: Quart, relay: Relay, caplog: pytest.LogCaptureFixture
) -> None:
    relay.reply = "451 4.3.0 Try again later"
    async with serving(app) as client:
        assert (await register(client)).status_code == 302
        assert (await client.get("/auth/unconfirmed")).status_code == 200
    warnings = _delivery_logs(caplog, logging.WARNING)
    assert len(warnings) == 2
    line = next(r for r in warnings if "Confirm Your Account" in r.getMessage())
    assert "alice@example.com" in line.getMessage()
    assert "451 4.3.0 Try again later" in line.getMessage()
    assert "attempt 1" in line.getMessage()
    assert "next attempt in" in line.getMessage()
    rows = await fetch_outbox(app)
    assert [row.status for row in rows] == ["pending", "pending"]
    assert all(row.attempts == 1 for row in rows)


async def test_relay_down_logged_and_serving(
    database_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    app = make_app(database_url, port, tmp_path)
    async with serving(app) as client:
        response = await register(client)
        assert response.status_code == 302
        home = await client.get("/auth/unconfirmed")
        assert home.status_code == 200
    warnings = _delivery_logs(caplog, logging.WARNING)
    assert len(warnings) == 2
    assert any("alice@example.com" in record.getMessage() for record in warnings)
    assert all("next attempt in" in record.getMessage() for record in warnings)
    assert [row.status for row in await fetch_outbox(app)] == ["pending", "pending"]


async def test_relay_drop_logged(
    app: Quart, relay: Relay, caplog: pytest.LogCaptureFixture
) -> None:
    relay.drop = True
    async with serving(app) as client:
        assert (await register(client)).status_code == 302
    assert len(_delivery_logs(caplog, logging.WARNING)) == 2
    assert relay.messages == []
    assert [row.status for row in await fetch_outbox(app)] == ["pending", "pending"]


async def test_relay_silent_times_out(
    database_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A server that accepts the connection and never says a word.
    connections: list[asyncio.StreamWriter] = []

    async def _accept(
        _reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        connections.append(writer)

    server = await asyncio.start_server(_accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    app = make_app(database_url, port, tmp_path, MAIL_TIMEOUT=0.5)
    try:
        async with serving(app) as client:
            assert (await register(client)).status_code == 302
            assert (await client.get("/healthz")).status_code == 200
    finally:
        for writer in connections:
            writer.close()
        server.close()
        await server.wait_closed()
    warnings = _delivery_logs(caplog, logging.WARNING)
    assert len(warnings) == 2
    assert all("timed out" in record.getMessage() for record in warnings)


async def test_send_email_starts_no_thread(
    app: Quart, relay: Relay, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The module of each started thread's target; Thread.run deletes the target.
    started: list[str | None] = []
    original_start = threading.Thread.start

    def _recording_start(self: threading.Thread) -> None:
        target = getattr(self, "_target", None)
        started.append(getattr(target, "__module__", None))
        original_start(self)

    async with app.test_app():
        monkeypatch.setattr(threading.Thread, "start", _recording_start)
        async with app.app_context():
            await send_email(
                "bob@example.com", "Hello", "email/new_user", user=_FakeUser()
            )
            await get_session().commit()
        message = await relay.next_message()
        monkeypatch.undo()
    assert message["Subject"] == "[Quart App] Hello"
    # aiosqlite runs each SQLite connection on a thread of its own, so opening a
    # database connection may start one; nothing else may.
    assert [module for module in started if module != "aiosqlite.core"] == []
    if not app.config["DATABASE_URL"].startswith("sqlite"):
        assert started == []


class _FakeUser:
    username = "<b>bob</b> & co"
    email = "bob@example.com"


async def test_send_email_escapes_html_part(app: Quart, relay: Relay) -> None:
    async with app.test_app():
        async with app.app_context():
            await send_email(
                ADMIN_EMAIL, "New User", "email/new_user", user=_FakeUser()
            )
            await get_session().commit()
        message = await relay.next_message()
    text, html = parts_of(message)
    assert "<b>bob</b> & co" in text
    assert "&lt;b&gt;bob&lt;/b&gt; &amp; co" in html
    assert "<b>bob</b>" not in html


@pytest.mark.parametrize(
    ("to", "subject"),
    [
        ("bob@example.com\r\nBcc: victim@example.com", "Hello"),
        ("bob@example.com", "Hello\r\nBcc: victim@example.com"),
        ("bob@example.com", "Hello\nBcc: victim@example.com"),
    ],
)
async def test_send_email_rejects_header_injection(
    app: Quart, relay: Relay, to: str, subject: str
) -> None:
    async with app.test_app():
        async with app.app_context():
            with pytest.raises(ValueError):
                await send_email(to, subject, "email/new_user", user=_FakeUser())
    assert relay.messages == []


async def test_new_user_notice_skipped_without_admin(
    database_url: str, relay: Relay, tmp_path: Path
) -> None:
    app = make_app(database_url, relay.port, tmp_path, APP_ADMIN=None)
    async with serving(app) as client:
        assert (await register(client)).status_code == 302
    subjects = [message["Subject"] for message in relay.messages]
    assert subjects == ["[Quart App] Confirm Your Account"]


async def test_message_headers(app: Quart, relay: Relay) -> None:
    async with serving(app) as client:
        await register(client)
        message = await relay.next_message()
    assert message["From"] == "Quart App <noreply@app.test>"
    assert message["Message-ID"].endswith("@app.test>")
    assert message["Date"] is not None
    envelope = relay.envelopes[0]
    assert envelope.mail_from == "noreply@app.test"


async def test_subject_prefix_setting(
    database_url: str, relay: Relay, tmp_path: Path
) -> None:
    app = make_app(
        database_url,
        relay.port,
        tmp_path,
        MAIL_SUBJECT_PREFIX="[Acme]",
        MAIL_DEFAULT_SENDER="Acme <hello@acme.example>",
    )
    async with serving(app) as client:
        await register(client)
        message = await relay.next_message()
        page = await client.get("/auth/unconfirmed")
        assert "alice@example.com" in await page_text(page)
    assert message["Subject"].startswith("[Acme] ")
    assert message["From"] == "Acme <hello@acme.example>"
