"""The email outbox: rows written with the change that caused them, then delivered.

`enqueue` adds a row to the caller's session, and `retry_message` queues a failed
row again. When that session commits, the rows it wrote are handed to
`app.add_background_task` for immediate delivery. If it rolls back, they are
gone with the rest of the change.
"""

from email.message import EmailMessage
from email.utils import getaddresses, parseaddr
from typing import Any, cast

from quart import Quart, current_app
from sqlalchemy import event, update
from sqlalchemy.engine import CursorResult
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from quart_app.db import AppSession
from quart_app.errors import OutboxMessageNotFailed, OutboxMessageNotFound
from quart_app.models import OutboxMessage, OutboxStatus, utcnow
from quart_app.outbox.delivery import Outbox, classify, count_pending, outbox_stats

__all__ = (
    "Outbox",
    "OutboxMessage",
    "OutboxStatus",
    "classify",
    "count_pending",
    "enqueue",
    "init_app",
    "outbox_stats",
    "retry_message",
)

# Session.info key for the ids of the rows written in the current transaction.
_WRITTEN = "outbox_written_ids"


async def enqueue(
    message: EmailMessage, *, session: AsyncSession, user_id: int | None = None
) -> OutboxMessage:
    """Add `message` to the outbox in `session`'s transaction; the caller commits.

    The row is flushed so it has an id. It is delivered right after the commit,
    in a background task.
    """
    _, sender = parseaddr(message["From"])
    recipients = [address for _, address in getaddresses(message.get_all("To", []))]
    row = OutboxMessage(
        user_id=user_id,
        sender=sender,
        recipients=recipients,
        subject=message["Subject"],
        message=message.as_bytes(),
        status=OutboxStatus.PENDING.value,
        attempts=0,
        next_attempt_at=utcnow(),
        created_at=utcnow(),
    )
    session.add(row)
    await session.flush()
    session.sync_session.info.setdefault(_WRITTEN, []).append(row.id)
    return row


async def retry_message(*, session: AsyncSession, message_id: int) -> OutboxMessage:
    """Move a failed row back to pending with a fresh count of attempts.

    The change is made in `session`'s transaction and the caller commits. Like a
    new row, the message is sent in a background task right after that commit.
    Its age still counts from when it was first queued, so once MAIL_MAX_AGE has
    passed, a transient failure of the new attempt marks it failed again.

    Raises:
        OutboxMessageNotFound: no row has that id.
        OutboxMessageNotFailed: the row is pending, being sent or sent.
    """
    # The status is checked in the UPDATE itself, so of two retries at once only
    # one moves the row, and a row that a worker has claimed is never changed.
    result = await session.execute(
        update(OutboxMessage)
        .where(
            OutboxMessage.id == message_id,
            OutboxMessage.status == OutboxStatus.FAILED.value,
        )
        .values(
            status=OutboxStatus.PENDING.value,
            attempts=0,
            next_attempt_at=utcnow(),
        )
        .execution_options(synchronize_session=False)
    )
    row = await session.get(OutboxMessage, message_id, populate_existing=True)
    if row is None:
        raise OutboxMessageNotFound(message_id)
    if cast(CursorResult[Any], result).rowcount != 1:
        raise OutboxMessageNotFailed(message_id, row.status)
    session.sync_session.info.setdefault(_WRITTEN, []).append(row.id)
    return row


def init_app(app: Quart) -> None:
    """Open the outbox while serving, and run its delivery loop if OUTBOX_WORKER."""
    outbox = Outbox(app)
    app.extensions["outbox"] = outbox

    @app.before_serving
    async def _open_outbox() -> None:
        from quart_app.email import smtp_options

        await outbox.open(smtp_options())
        if app.config["OUTBOX_WORKER"]:
            app.add_background_task(outbox.run, app.shutdown_event)

    # Quart's shutdown waits for the background tasks before the after_serving
    # functions run, so no send of this process is still in progress here.
    app.after_serving(outbox.close)


@event.listens_for(AppSession, "after_commit")
def _deliver_after_commit(session: Session) -> None:
    ids = session.info.pop(_WRITTEN, None)
    if ids:
        current_app.add_background_task(current_app.extensions["outbox"].deliver, ids)


@event.listens_for(AppSession, "after_rollback")
def _forget_after_rollback(session: Session) -> None:
    session.info.pop(_WRITTEN, None)
