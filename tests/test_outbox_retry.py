import asyncio
from email.message import EmailMessage

import pytest
from quart import Quart

from quart_app.db import get_session
from quart_app.errors import OutboxMessageNotFailed, OutboxMessageNotFound
from quart_app.outbox import enqueue, retry_message
from tests.conftest import Relay, fetch_outbox

REJECTED = "550 5.7.1 Message rejected"


def _message(to: str = "alice@example.com") -> EmailMessage:
    message = EmailMessage()
    message["From"] = "Quart App <noreply@app.test>"
    message["To"] = to
    message["Subject"] = "Retry me"
    message.set_content("Body")
    return message


async def _failed_message(app: Quart, relay: Relay) -> int:
    """Queue one message that the relay rejects for good, and return its id."""
    relay.reply = REJECTED
    async with app.test_app(), app.app_context():
        session = get_session()
        row = await enqueue(_message(), session=session)
        await session.commit()
    # Leaving test_app() waited for the send, so the row has failed by now.
    relay.reply = None
    return row.id


async def test_retry_message_sends_failed_again(app: Quart, relay: Relay) -> None:
    message_id = await _failed_message(app, relay)

    async with app.test_app(), app.app_context():
        session = get_session()
        row = await retry_message(session=session, message_id=message_id)
        assert row.status == "pending"
        assert row.attempts == 0
        await session.commit()
        delivered = await relay.next_message()

    assert delivered["Subject"] == "Retry me"
    [row] = await fetch_outbox(app)
    assert row.status == "sent"
    assert row.attempts == 1


async def test_retry_message_unknown_id(app: Quart, relay: Relay) -> None:
    async with app.test_app(), app.app_context():
        with pytest.raises(OutboxMessageNotFound) as raised:
            await retry_message(session=get_session(), message_id=12345)
    assert raised.value.message_id == 12345


async def test_retry_message_sent_rejected(app: Quart, relay: Relay) -> None:
    async with app.test_app(), app.app_context():
        session = get_session()
        row = await enqueue(_message(), session=session)
        await session.commit()
    async with app.test_app(), app.app_context():
        with pytest.raises(OutboxMessageNotFailed) as raised:
            await retry_message(session=get_session(), message_id=row.id)
    assert raised.value.status == "sent"
    assert len(relay.messages) == 1


async def test_retry_command_sends_failed(app: Quart, relay: Relay) -> None:
    message_id = await _failed_message(app, relay)
    runner = app.test_cli_runner()

    # The command runs its own event loop, so it gets a thread of its own while
    # the relay keeps serving on this one.
    result = await asyncio.to_thread(
        runner.invoke, args=["outbox", "retry", str(message_id)]
    )

    assert result.exit_code == 0, result.output
    assert f"queued outbox message {message_id}" in result.output
    assert (await relay.next_message())["Subject"] == "Retry me"


async def test_retry_command_unknown_id(app: Quart, relay: Relay) -> None:
    runner = app.test_cli_runner()
    result = await asyncio.to_thread(runner.invoke, args=["outbox", "retry", "77"])
    assert result.exit_code == 1
    assert "Outbox message 77 does not exist." in result.output
