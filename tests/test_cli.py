"""The `quart --app quart_app` commands, run against a real relay and database.

Each command starts the app with `asyncio.run`, so it runs in a thread here, and the
test's own event loop keeps serving the relay meanwhile.
"""

import asyncio
from pathlib import Path

import pytest
from click.testing import Result
from quart import Quart
from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncSession

from quart_app.db import create_engine
from quart_app.models import OutboxMessage
from tests.conftest import Relay, fetch_outbox, make_app


async def _invoke(app: Quart, *args: str) -> Result:
    runner = app.test_cli_runner()
    return await asyncio.to_thread(runner.invoke, args=list(args))


async def _fail_every_row(app: Quart, error: str) -> None:
    engine = create_engine(app.config["DATABASE_URL"])
    try:
        async with AsyncSession(engine) as session:
            await session.execute(
                update(OutboxMessage).values(status="failed", last_error=error)
            )
            await session.commit()
    finally:
        await engine.dispose()


async def test_send_test_email_delivered(app: Quart, relay: Relay) -> None:
    result = await _invoke(app, "send-test-email", "Bob@Example.com")
    message = await relay.next_message()
    assert result.exit_code == 0, result.output
    assert "sent to Bob@example.com" in result.output
    assert message["To"] == "Bob@example.com"
    assert message["Subject"] == "[Quart App] Test email"


async def test_send_test_email_idn_domain(app: Quart, relay: Relay) -> None:
    result = await _invoke(app, "send-test-email", "bob@bücher.example")
    message = await relay.next_message()
    assert result.exit_code == 0, result.output
    assert message["To"] == "bob@xn--bcher-kva.example"


async def test_send_test_email_refused(app: Quart, relay: Relay) -> None:
    relay.reply = "550 5.7.1 Relaying denied"
    result = await _invoke(app, "send-test-email", "bob@example.com")
    assert result.exit_code == 1
    assert "failed: 550 5.7.1 Relaying denied" in result.output


@pytest.mark.parametrize(
    "address", ["not-an-address", "jürgen@example.com", "bob@", "a\r\nb@example.com"]
)
async def test_send_test_email_invalid_address(
    app: Quart, relay: Relay, address: str
) -> None:
    result = await _invoke(app, "send-test-email", address)
    assert result.exit_code == 2
    assert "Invalid value for ADDRESS" in result.output
    assert "Traceback" not in result.output
    assert await fetch_outbox(app) == []


async def test_status_lists_failed_message(app: Quart, relay: Relay) -> None:
    assert (await _invoke(app, "send-test-email", "bob@example.com")).exit_code == 0
    await _fail_every_row(app, "550 5.1.1 No such user")
    result = await _invoke(app, "outbox", "status")
    assert result.exit_code == 0, result.output
    assert "  failed: 1" in result.output
    assert "    sent: 0" in result.output
    assert "failed 1: to bob@example.com" in result.output
    assert "550 5.1.1 No such user" in result.output


async def test_status_logs_no_shutdown_report(
    app: Quart, relay: Relay, caplog: pytest.LogCaptureFixture
) -> None:
    relay.reply = "451 4.3.0 Try again later"
    queued = await _invoke(app, "send-test-email", "bob@example.com")
    caplog.clear()
    result = await _invoke(app, "outbox", "status")
    assert queued.exit_code == 1
    assert "not sent yet: 451 4.3.0 Try again later" in queued.output
    assert result.exit_code == 0, result.output
    assert " pending: 1" in result.output
    messages = [record.getMessage() for record in caplog.records]
    assert not [text for text in messages if "pending for the next start" in text]
    assert not [text for text in messages if "release outbox leases" in text]


async def test_retry_sends_failed_message(app: Quart, relay: Relay) -> None:
    assert (await _invoke(app, "send-test-email", "bob@example.com")).exit_code == 0
    await relay.next_message()
    await _fail_every_row(app, "451 4.3.0 Try again later")
    result = await _invoke(app, "outbox", "retry", "1")
    message = await relay.next_message()
    [row] = await fetch_outbox(app)
    assert result.exit_code == 0, result.output
    assert "queued outbox message 1" in result.output
    assert message["To"] == "bob@example.com"
    assert row.status == "sent"
    assert row.attempts == 1


async def test_retry_unknown_or_sent_rejected(app: Quart, relay: Relay) -> None:
    assert (await _invoke(app, "send-test-email", "bob@example.com")).exit_code == 0
    unknown = await _invoke(app, "outbox", "retry", "42")
    sent = await _invoke(app, "outbox", "retry", "1")
    assert unknown.exit_code == 1
    assert "42" in unknown.output
    assert "does not exist" in unknown.output
    assert sent.exit_code == 1
    assert "sent" in sent.output
    assert len(relay.messages) == 1


@pytest.mark.parametrize("message_id", ["0", "-1", "abc", "99999999999"])
async def test_retry_invalid_id_rejected(
    app: Quart, relay: Relay, message_id: str
) -> None:
    result = await _invoke(app, "outbox", "retry", "--", message_id)
    assert result.exit_code == 2
    assert "Invalid value for 'MESSAGE_ID'" in result.output


async def test_commands_without_schema_one_line(relay: Relay, tmp_path: Path) -> None:
    app = make_app(f"sqlite+aiosqlite:///{tmp_path / 'empty.db'}", relay.port, tmp_path)
    for command in (
        ["outbox", "status"],
        ["outbox", "retry", "1"],
        ["send-test-email", "bob@example.com"],
    ):
        result = await _invoke(app, *command)
        assert result.exit_code == 1, command
        assert "run `alembic upgrade head` first" in result.output, command
        assert "Traceback" not in result.output, command
        assert len(result.output.strip().splitlines()) == 1, result.output
