"""The email outbox: rows written with the change that caused them, then delivered.

`enqueue` adds a row to the caller's session. When that session commits, the rows
it wrote are handed to `app.add_background_task` for immediate delivery. If it
rolls back, they are gone with the rest of the change.
"""

from email.message import EmailMessage
from email.utils import getaddresses, parseaddr

from quart import Quart, current_app
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from quart_app.db import AppSession
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
