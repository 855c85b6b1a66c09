import asyncio
import logging
from datetime import timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP
from quart import Quart
from sqlalchemy import update
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncSession

from quart_app import accounts
from quart_app.account_emails import send_confirmation
from quart_app.db import create_engine, get_session
from quart_app.models import OutboxMessage, create_user, utcnow
from quart_app.outbox import Outbox, classify, enqueue
from tests.conftest import (
    Relay,
    fetch_outbox,
    free_port,
    make_app,
    page_text,
    register,
    serving,
)

# Fast retries, so a test sees the second attempt within a fraction of a second.
QUICK_RETRIES = {
    "MAIL_RETRY_DELAY": 0.05,
    "MAIL_RETRY_MAX_DELAY": 0.1,
    "OUTBOX_POLL_INTERVAL": 0.05,
}


def _message(to: str, subject: str) -> EmailMessage:
    message = EmailMessage()
    message["From"] = "Quart App <noreply@app.test>"
    message["To"] = to
    message["Subject"] = subject
    message.set_content(f"Body of {subject}")
    return message


async def _enqueue_and_commit(app: Quart, *messages: EmailMessage) -> None:
    async with app.app_context():
        session = get_session()
        for message in messages:
            await enqueue(message, session=session)
        await session.commit()


async def test_rolled_back_signup_sends_nothing(app: Quart, relay: Relay) -> None:
    async with app.test_app():
        async with app.test_request_context("/auth/register", method="POST"):
            session = get_session()
            user = await create_user(
                session=session,
                email="alice@example.com",
                username="alice",
                password_hash="x",
            )
            await send_confirmation(user, session=session)
            await session.rollback()
    assert await fetch_outbox(app) == []
    assert relay.messages == []


async def test_committed_signup_has_outbox_row(app: Quart, relay: Relay) -> None:
    async with serving(app) as client:
        await register(client)
    rows = await fetch_outbox(app)
    assert [row.status for row in rows] == ["sent", "sent"]
    assert {row.subject for row in rows} == {
        "[Quart App] Confirm Your Account",
        "[Quart App] New User",
    }
    assert all(row.attempts == 1 for row in rows)
    assert all(row.sent_at is not None for row in rows)
    assert all(row.lease_token is None for row in rows)
    [user] = [row.user_id for row in rows if "Confirm" in row.subject]
    assert user is not None


async def test_racing_signup_sends_nothing(
    app: Quart, relay: Relay, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two requests for the same address can both pass the check before the
    # insert. The unique index then rejects the second, and its emails must
    # vanish with it. Here the first check misses the existing user, as it
    # would if that user had committed just after the check.
    email_taken = accounts.email_taken
    checks: list[object] = []

    async def _missed_once(**arguments: Any) -> bool:
        checks.append(arguments)
        return len(checks) > 1 and await email_taken(**arguments)

    async with serving(app) as client:
        await register(client)
        await client.get("/auth/logout")
        monkeypatch.setattr(accounts, "email_taken", _missed_once)
        response = await register(client, username="alice2")
        assert response.status_code == 200
        assert "already registered" in await page_text(response)
    assert len(checks) == 2
    assert len(await fetch_outbox(app)) == 2
    assert len(relay.messages) == 2


async def test_failed_pass_leaves_no_task_running(tmp_path: Path) -> None:
    # Without tables every claim fails, on each of the pass's connections. The
    # pass must raise only after all of them have stopped, because a drain still
    # running would outlive the engine and leave its database connection open.
    app = make_app(
        f"sqlite+aiosqlite:///{tmp_path / 'empty.db'}",
        free_port(),
        tmp_path,
        MAIL_MAX_CONNECTIONS=4,
        OUTBOX_WORKER=False,
    )
    async with app.test_app(), app.app_context():
        tasks_before = asyncio.all_tasks()
        with pytest.raises(OperationalError, match="no such table: outbox"):
            await app.extensions["outbox"].deliver_due()
        assert asyncio.all_tasks() == tasks_before


async def test_relay_down_then_up_delivered(database_url: str, tmp_path: Path) -> None:
    port = free_port()
    app = make_app(database_url, port, tmp_path, **QUICK_RETRIES)
    relay = Relay(port=port)
    async with serving(app) as client:
        running = set(app.background_tasks)
        assert (await register(client)).status_code == 302
        # The signup's commit started a task that tries the closed port. Waiting
        # for it keeps the relay from starting before a first attempt failed.
        await asyncio.gather(*(app.background_tasks - running))
        rows = await fetch_outbox(app)
        assert {row.status for row in rows} <= {"pending", "sending"}
        assert all(row.attempts >= 1 for row in rows)

        server = await asyncio.get_running_loop().create_server(
            lambda: SMTP(relay, hostname="relay.test"), host="127.0.0.1", port=port
        )
        try:
            subjects = {(await relay.next_message())["Subject"] for _ in range(2)}
        finally:
            server.close()
            await server.wait_closed()
    assert "[Quart App] Confirm Your Account" in subjects
    rows = await fetch_outbox(app)
    assert [row.status for row in rows] == ["sent", "sent"]
    assert all(row.attempts >= 2 for row in rows)


async def test_transient_then_accepted_delivered(
    database_url: str, relay: Relay, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    app = make_app(database_url, relay.port, tmp_path, APP_ADMIN=None, **QUICK_RETRIES)
    relay.replies = ["451 4.3.0 Try again later"]
    async with serving(app) as client:
        await register(client)
        message = await relay.next_message()
    assert "Confirm Your Account" in message["Subject"]
    [row] = await fetch_outbox(app)
    assert row.status == "sent"
    assert row.attempts == 2
    assert row.last_error == "451 4.3.0 Try again later"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(f"Outbox {row.id} attempt 1" in text for text in warnings)
    assert any("SMTP code 451" in text for text in warnings)


async def test_permanent_failure_not_retried(
    database_url: str, relay: Relay, tmp_path: Path
) -> None:
    app = make_app(database_url, relay.port, tmp_path, APP_ADMIN=None, **QUICK_RETRIES)
    relay.reply = "550 5.1.1 Mailbox unavailable"
    async with serving(app) as client:
        await register(client)
    [row] = await fetch_outbox(app)
    assert row.status == "failed"
    assert row.attempts == 1
    assert row.last_error == "550 5.1.1 Mailbox unavailable"

    # Another delivery pass finds nothing to claim.
    relay.reply = None
    async with app.test_app(), app.app_context():
        outbox: Outbox = app.extensions["outbox"]
        assert await outbox.deliver_due() == 0
    [row] = await fetch_outbox(app)
    assert row.status == "failed"
    assert relay.messages == []


async def test_gives_up_after_max_attempts(
    database_url: str, relay: Relay, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    app = make_app(
        database_url,
        relay.port,
        tmp_path,
        APP_ADMIN=None,
        MAIL_MAX_ATTEMPTS=3,
        **QUICK_RETRIES,
    )
    relay.reply = "421 4.7.0 Too busy"
    done = asyncio.Event()

    class _GaveUp(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "gave up after 3 attempts" in record.getMessage():
                done.set()

    handler = _GaveUp()
    logging.getLogger("quart_app.outbox.delivery").addHandler(handler)
    try:
        async with serving(app) as client:
            await register(client)
            await asyncio.wait_for(done.wait(), 10)
    finally:
        logging.getLogger("quart_app.outbox.delivery").removeHandler(handler)
    [row] = await fetch_outbox(app)
    assert row.status == "failed"
    assert row.attempts == 3
    assert row.last_error == "421 4.7.0 Too busy"


async def test_silent_relay_times_out_requests_unaffected(
    database_url: str, tmp_path: Path
) -> None:
    connections: list[asyncio.StreamWriter] = []
    second_connection = asyncio.Event()

    async def _accept(
        _reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        connections.append(writer)
        if len(connections) >= 2:
            second_connection.set()

    server = await asyncio.start_server(_accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    app = make_app(
        database_url, port, tmp_path, APP_ADMIN=None, MAIL_TIMEOUT=0.3, **QUICK_RETRIES
    )
    try:
        async with serving(app) as client:
            assert (await register(client)).status_code == 302
            # While the relay hangs, pages are served at once.
            for _ in range(5):
                response = await client.get("/auth/unconfirmed")
                assert response.status_code == 200
            await asyncio.wait_for(second_connection.wait(), 10)
    finally:
        for writer in connections:
            writer.close()
        server.close()
        await server.wait_closed()
    [row] = await fetch_outbox(app)
    assert row.status in {"pending", "sending"}
    assert row.attempts >= 1
    assert row.last_error is not None
    assert "timed out" in row.last_error or row.attempts >= 2


class _SlowStepRelay:
    """A relay that replies to each RCPT and DATA after `delay` seconds."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.accepted = 0

    async def handle_RCPT(  # noqa: N802 - the name aiosmtpd calls
        self,
        server: SMTP,
        session: Any,
        envelope: Any,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        await asyncio.sleep(self.delay)
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(  # noqa: N802 - the name aiosmtpd calls
        self, server: SMTP, session: Any, envelope: Any
    ) -> str:
        await asyncio.sleep(self.delay)
        self.accepted += 1
        return "250 2.0.0 Queued"


async def test_send_stopped_at_half_lease(database_url: str, tmp_path: Path) -> None:
    # Each step gets its reply within MAIL_TIMEOUT (1 s), but five steps of 0.6 s take
    # longer than half of OUTBOX_LEASE (2 s). Had the send gone on past the
    # lease, another worker could have taken the row over and sent it again.
    relay = _SlowStepRelay(delay=0.6)
    server = await asyncio.get_running_loop().create_server(
        lambda: SMTP(relay), host="127.0.0.1", port=0
    )
    port = server.sockets[0].getsockname()[1]
    app = make_app(
        database_url,
        port,
        tmp_path,
        MAIL_TIMEOUT=1,
        OUTBOX_LEASE=4,
        OUTBOX_WORKER=False,
    )
    recipients = ", ".join(f"user{number}@example.com" for number in range(4))
    try:
        async with app.test_app():
            await _enqueue_and_commit(app, _message(recipients, "Slow steps"))
    finally:
        server.close()
        await server.wait_closed()
    [row] = await fetch_outbox(app)
    assert relay.accepted == 0
    assert row.status == "pending"
    assert row.attempts == 1
    assert row.last_error is not None
    assert "longer than 2 s, half of OUTBOX_LEASE" in row.last_error


async def test_partly_refused_recipients_recorded(
    app: Quart, relay: Relay, caplog: pytest.LogCaptureFixture
) -> None:
    relay.refused_recipients = {"ghost@example.com"}
    message = _message("bob@example.com, ghost@example.com", "Two recipients")
    async with app.test_app():
        await _enqueue_and_commit(app, message)
        received = await relay.next_message()
    assert received["Subject"] == "Two recipients"
    assert relay.envelopes[0].rcpt_tos == ["bob@example.com"]
    [row] = await fetch_outbox(app)
    assert row.status == "sent"
    assert row.recipients == ["bob@example.com", "ghost@example.com"]
    assert row.refused_recipients == {"ghost@example.com": "550 5.1.1 No such user"}
    assert any("refused some recipients" in r.getMessage() for r in caplog.records)


async def test_all_recipients_refused_fails(app: Quart, relay: Relay) -> None:
    relay.refused_recipients = {"ghost@example.com"}
    async with app.test_app():
        await _enqueue_and_commit(app, _message("ghost@example.com", "Nobody home"))
    [row] = await fetch_outbox(app)
    assert row.status == "failed"
    assert "550" in (row.last_error or "")
    assert relay.messages == []


async def test_burst_uses_bounded_connections(
    database_url: str, relay: Relay, tmp_path: Path
) -> None:
    app = make_app(
        database_url,
        relay.port,
        tmp_path,
        MAIL_MAX_CONNECTIONS=3,
        MAIL_MAX_MESSAGES_PER_CONNECTION=1000,
    )
    count = 300
    async with app.test_app():
        # One commit per message, as 300 separate signups would do.
        for number in range(count):
            await _enqueue_and_commit(
                app, _message("bob@example.com", f"Burst {number}")
            )
        subjects = [(await relay.next_message())["Subject"] for _ in range(count)]
    assert sorted(subjects) == sorted(f"Burst {number}" for number in range(count))
    assert len(set(relay.peers)) <= 3
    rows = await fetch_outbox(app)
    assert {row.status for row in rows} == {"sent"}


async def test_connection_closed_after_message_limit(
    database_url: str, relay: Relay, tmp_path: Path
) -> None:
    app = make_app(
        database_url,
        relay.port,
        tmp_path,
        MAIL_MAX_CONNECTIONS=1,
        MAIL_MAX_MESSAGES_PER_CONNECTION=2,
    )
    async with app.test_app():
        await _enqueue_and_commit(
            app, *(_message("bob@example.com", f"Limit {n}") for n in range(5))
        )
        for _ in range(5):
            await relay.next_message()
    assert len(set(relay.peers)) == 3


async def test_shutdown_lets_send_in_flight_finish(
    database_url: str, relay: Relay, tmp_path: Path
) -> None:
    app = make_app(database_url, relay.port, tmp_path, APP_ADMIN=None)
    relay.hold = True
    test_app = app.test_app()
    await test_app.startup()
    client = test_app.test_client()
    assert (await register(client)).status_code == 302
    await asyncio.wait_for(relay.data_started.wait(), 10)

    shutdown = asyncio.create_task(test_app.shutdown())
    await asyncio.wait_for(app.shutdown_event.wait(), 10)
    relay.release.set()
    await asyncio.wait_for(shutdown, 20)

    assert len(relay.messages) == 1
    [row] = await fetch_outbox(app)
    assert row.status == "sent"


async def test_shutdown_timeout_leaves_row_pending(
    database_url: str, relay: Relay, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    app = make_app(
        database_url,
        relay.port,
        tmp_path,
        APP_ADMIN=None,
        BACKGROUND_TASK_SHUTDOWN_TIMEOUT=0.2,
    )
    relay.hold = True
    async with serving(app) as client:
        assert (await register(client)).status_code == 302
        await asyncio.wait_for(relay.data_started.wait(), 10)
    # Quart cancelled the send after its timeout; the row is pending again.
    [row] = await fetch_outbox(app)
    assert row.status == "pending"
    assert row.lease_token is None
    assert any(
        "Shutdown interrupted 1 outbox sends" in r.getMessage() for r in caplog.records
    )

    relay.hold = False
    relay.release.set()
    restarted = make_app(database_url, relay.port, tmp_path, APP_ADMIN=None)
    async with restarted.test_app():
        message = await relay.next_message()
    assert "Confirm Your Account" in message["Subject"]
    [row] = await fetch_outbox(app)
    assert row.status == "sent"
    assert len(relay.messages) == 1


async def test_expired_lease_taken_over(
    database_url: str, relay: Relay, tmp_path: Path
) -> None:
    app = make_app(
        database_url, relay.port, tmp_path, APP_ADMIN=None, OUTBOX_WORKER=False
    )
    async with app.test_app():
        await _enqueue_and_commit(app, _message("bob@example.com", "Orphan"))
        await relay.next_message()
    # Make the row look as if a worker claimed it and died.
    engine = create_engine(database_url)
    async with AsyncSession(engine) as session:
        await session.execute(
            update(OutboxMessage).values(
                status="sending",
                lease_owner="dead-worker",
                lease_token="0" * 32,
                lease_expires_at=utcnow() - timedelta(seconds=1),
            )
        )
        await session.commit()
    await engine.dispose()

    async with app.test_app(), app.app_context():
        assert await app.extensions["outbox"].deliver_due() == 1
    [row] = await fetch_outbox(app)
    assert row.status == "sent"
    assert row.attempts == 2
    assert row.last_error == (
        "taken over: the lease of worker dead-worker expired before it recorded "
        "the outcome"
    )
    assert len(relay.messages) == 2


async def test_live_lease_not_taken_over(
    database_url: str, relay: Relay, tmp_path: Path
) -> None:
    app = make_app(database_url, relay.port, tmp_path, OUTBOX_WORKER=False)
    engine = create_engine(database_url)
    async with AsyncSession(engine) as session:
        session.add(
            OutboxMessage(
                sender="noreply@app.test",
                recipients=["bob@example.com"],
                subject="Busy",
                message=_message("bob@example.com", "Busy").as_bytes(),
                status="sending",
                attempts=1,
                next_attempt_at=utcnow(),
                created_at=utcnow(),
                lease_owner="live-worker",
                lease_token="1" * 32,
                lease_expires_at=utcnow() + timedelta(minutes=5),
            )
        )
        await session.commit()
    await engine.dispose()
    async with app.test_app(), app.app_context():
        assert await app.extensions["outbox"].deliver_due() == 0
    assert relay.messages == []


async def test_healthz_reports_outbox(
    database_url: str, relay: Relay, tmp_path: Path
) -> None:
    app = make_app(
        database_url, relay.port, tmp_path, APP_ADMIN=None, OUTBOX_WORKER=False
    )
    relay.reply = "550 5.1.1 Mailbox unavailable"
    async with serving(app) as client:
        await register(client)
    relay.reply = "451 4.3.0 Later"
    async with serving(app) as client:
        await register(client, email="bob@example.com", username="bob")
    async with serving(app) as client:
        response = await client.get("/healthz")
        body = await response.get_json()
    assert response.status_code == 200
    assert body["outbox"]["failed"] == 1
    assert body["outbox"]["pending"] == 1
    assert body["outbox"]["stuck"] == 0
    assert body["outbox"]["oldest_pending_age_seconds"] >= 0


@pytest.mark.parametrize(
    ("error", "transient", "code"),
    [
        (ConnectionRefusedError("refused"), True, None),
        (TimeoutError(), True, None),
    ],
)
def test_classify_network_errors(
    error: Exception, transient: bool, code: int | None
) -> None:
    failure = classify(error)
    assert failure.transient is transient
    assert failure.code == code


def test_classify_smtp_replies() -> None:
    import aiosmtplib

    assert classify(aiosmtplib.SMTPDataError(451, "later")).transient
    assert not classify(aiosmtplib.SMTPDataError(554, "no")).transient
    assert classify(aiosmtplib.SMTPServerDisconnected("gone")).transient
    assert classify(aiosmtplib.SMTPAuthenticationError(535, "bad")).transient
    refused = aiosmtplib.SMTPRecipientsRefused(
        [aiosmtplib.SMTPRecipientRefused(550, "no", "a@example.com")]
    )
    assert not classify(refused).transient
    mixed = aiosmtplib.SMTPRecipientsRefused(
        [
            aiosmtplib.SMTPRecipientRefused(550, "no", "a@example.com"),
            aiosmtplib.SMTPRecipientRefused(452, "full", "b@example.com"),
        ]
    )
    assert classify(mixed).transient


async def test_unsendable_row_fails_others_delivered(
    database_url: str, relay: Relay, tmp_path: Path
) -> None:
    app = make_app(database_url, relay.port, tmp_path, OUTBOX_WORKER=False)
    engine = create_engine(database_url)
    async with AsyncSession(engine) as session:
        for recipient in ("josé@example.com", "bob@example.com"):
            session.add(
                OutboxMessage(
                    sender="noreply@app.test",
                    recipients=[recipient],
                    subject=f"To {recipient}",
                    message=_message("bob@example.com", "Body").as_bytes(),
                    status="pending",
                    attempts=0,
                    next_attempt_at=utcnow(),
                    created_at=utcnow(),
                )
            )
        await session.commit()
    await engine.dispose()

    async with app.test_app(), app.app_context():
        assert await app.extensions["outbox"].deliver_due() == 2
    poison, good = await fetch_outbox(app)
    assert poison.status == "failed"
    assert (poison.last_error or "").startswith("cannot be sent: UnicodeEncodeError")
    assert good.status == "sent"
    assert len(relay.messages) == 1


async def test_sent_log_has_reply_code(
    app: Quart, relay: Relay, caplog: pytest.LogCaptureFixture
) -> None:
    async with app.test_app():
        await _enqueue_and_commit(app, _message("bob@example.com", "Logged"))
    sent = [r.getMessage() for r in caplog.records if " sent to " in r.getMessage()]
    assert len(sent) == 1
    assert sent[0].endswith(": 250 2.0.0 Queued")
