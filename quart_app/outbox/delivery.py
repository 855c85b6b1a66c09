"""Delivery of outbox rows: claim with a lease, send, then record the outcome.

Rows reach the relay two ways. Right after a commit that wrote rows, a background
task sends exactly those rows, so the normal path is as fast as sending directly.
A delivery loop (one per serving process, and the `outbox send-pending` command)
picks up what is due: retries, and rows that a crashed or killed process left
behind. Delivery is at least once. A row is claimed before it is sent, so two
workers never send it at the same time. A claim expires after OUTBOX_LEASE
seconds, and only then may another worker take the row over.
"""

import asyncio
import logging
import os
import random
import socket
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import aiosmtplib
from quart import Quart
from sqlalchemy import and_, case, func, literal, or_, select, update
from sqlalchemy.engine import CursorResult, Result
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.sql.elements import ColumnElement

from quart_app.db import describe_error, session_scope
from quart_app.models import OutboxMessage, OutboxStatus, utcnow
from quart_app.outbox.smtp import SendResult, SMTPPool

logger = logging.getLogger(__name__)

# The start of last_error on a row taken over from a worker whose lease expired.
_TAKEOVER = "taken over: the lease of worker "
# How many due rows a SQLite worker reads before it tries to claim one of them.
_SQLITE_CANDIDATES = 20

Claim = Callable[[AsyncSession], Awaitable[OutboxMessage | None]]


@dataclass(frozen=True)
class Failure:
    """A failed attempt, classified for the retry decision."""

    transient: bool
    code: int | None
    description: str


def classify(error: BaseException) -> Failure:
    """Decide whether a failed send may succeed later.

    4xx replies, disconnects, timeouts and refused connections are transient.
    5xx replies, a message whose recipients were all refused with 5xx, and errors
    that do not come from the network or the relay are permanent. An
    authentication failure is treated as transient, because it
    means the settings are wrong, not the message, and the message should go out
    once they are fixed.
    """
    if isinstance(error, aiosmtplib.SMTPRecipientsRefused):
        codes = [refusal.code for refusal in error.recipients]
        replies = "; ".join(
            f"{refusal.recipient}: {refusal.code} {refusal.message}"
            for refusal in error.recipients
        )
        transient = any(400 <= code < 500 for code in codes)
        return Failure(transient, codes[0] if codes else None, f"refused {replies}")
    if isinstance(error, aiosmtplib.SMTPAuthenticationError):
        return Failure(
            True,
            error.code,
            f"{error.code} {error.message} (check MAIL_USERNAME and MAIL_PASSWORD)",
        )
    if isinstance(error, aiosmtplib.SMTPResponseException):
        permanent = 500 <= error.code < 600
        return Failure(not permanent, error.code, f"{error.code} {error.message}")
    if isinstance(error, aiosmtplib.SMTPTimeoutError | TimeoutError):
        return Failure(True, None, f"timed out: {error}")
    if not isinstance(error, aiosmtplib.SMTPException | OSError):
        # Not a network or relay problem, so a retry would fail the same way.
        return Failure(False, None, f"cannot be sent: {type(error).__name__}: {error}")
    description = str(error) or type(error).__name__
    return Failure(True, None, f"{type(error).__name__}: {description}")


class Outbox:
    """The delivery side of the outbox for one app process."""

    def __init__(self, app: Quart) -> None:
        self.app = app
        config = app.config
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.max_connections: int = config["MAIL_MAX_CONNECTIONS"]
        self.max_attempts: int = config["MAIL_MAX_ATTEMPTS"]
        self.max_age = timedelta(seconds=config["MAIL_MAX_AGE"])
        self.retry_delay: float = config["MAIL_RETRY_DELAY"]
        self.retry_max_delay: float = config["MAIL_RETRY_MAX_DELAY"]
        self.lease = timedelta(seconds=config["OUTBOX_LEASE"])
        # A send that outlived its lease could be taken over and sent a second
        # time by another worker, so each send ends at half the lease.
        self.send_time_limit: float = config["OUTBOX_LEASE"] / 2
        self.poll_interval: float = config["OUTBOX_POLL_INTERVAL"]
        self.pool: SMTPPool | None = None
        # Whether this process ran the delivery loop or claimed a row, and so
        # has pending counts to report or leases to release at shutdown.
        self.ran_loop = False
        self.claimed_any = False

    async def open(self, smtp_options: dict[str, Any] | None) -> None:
        """Prepare the connection pool; with no relay configured, nothing is sent."""
        if smtp_options is None:
            logger.error(
                "MAIL_SERVER is not set: outbox messages stay pending until it is"
            )
            return
        self.pool = SMTPPool(
            smtp_options,
            max_connections=self.max_connections,
            max_messages=self.app.config["MAIL_MAX_MESSAGES_PER_CONNECTION"],
        )

    async def close(self) -> None:
        """Close the connections and hand back rows this process still holds.

        Runs after the background tasks have finished or been cancelled, so a
        row still marked as sending by this worker is no longer being sent.
        Releasing it lets the next start send it at once, instead of waiting
        for the lease to expire.
        """
        if self.pool is not None:
            await self.pool.close()
            self.pool = None
        if not (self.ran_loop or self.claimed_any):
            return
        try:
            async with session_scope() as session:
                released = await self._release_leases(session)
                pending = await count_pending(session)
        except (SQLAlchemyError, OSError) as error:
            logger.error(
                "Failed to release outbox leases at shutdown: %s", describe_error(error)
            )
            return
        if released:
            logger.warning(
                "Shutdown interrupted %d outbox sends; they are pending again", released
            )
        if pending and self.ran_loop:
            logger.info("%d outbox messages are pending for the next start", pending)

    async def deliver(self, ids: list[int]) -> None:
        """Send the rows `ids`, written by a transaction that just committed."""
        outcomes = await asyncio.gather(
            *(self._deliver_one(self._claim_by_id(id_)) for id_ in ids),
            return_exceptions=True,
        )
        for id_, outcome in zip(ids, outcomes, strict=True):
            if isinstance(outcome, SQLAlchemyError | OSError):
                # The row is still in the outbox, pending or leased, so the
                # delivery loop sends it once the database responds again.
                logger.error(
                    "Outbox %d: the database failed during delivery; the delivery "
                    "loop will retry it: %s",
                    id_,
                    describe_error(outcome),
                )
            elif isinstance(outcome, BaseException):
                raise outcome

    async def deliver_due(self, stop: asyncio.Event | None = None) -> int:
        """Send every row that is due, over up to MAIL_MAX_CONNECTIONS connections.

        Returns how many rows were claimed. `stop`, when set, ends the pass
        after the sends in progress. If claiming or recording a row fails, the
        other connections finish their rows first, and then the first error is
        raised.
        """

        async def drain() -> int:
            claimed = 0
            while stop is None or not stop.is_set():
                if await self._deliver_one(self._claim_next_due) is None:
                    break
                claimed += 1
            return claimed

        # Without return_exceptions, gather raises at the first failure and leaves
        # the other drains running unawaited. They outlive the pass and the engine
        # disposed at shutdown, so their database connections are never closed.
        outcomes = await asyncio.gather(
            *(drain() for _ in range(self.max_connections)), return_exceptions=True
        )
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        return sum(outcome for outcome in outcomes if isinstance(outcome, int))

    async def run(self, stop: asyncio.Event) -> None:
        """Deliver due rows every OUTBOX_POLL_INTERVAL seconds until `stop` is set."""
        self.ran_loop = True
        logger.info(
            "Outbox delivery loop started (worker %s, every %.1f s)",
            self.worker_id,
            self.poll_interval,
        )
        while not stop.is_set():
            try:
                await self.deliver_due(stop)
            except (SQLAlchemyError, OSError) as error:
                logger.error(
                    "Outbox delivery pass failed; next pass in %.1f s: %s",
                    self.poll_interval,
                    describe_error(error),
                )
            # The loop is the only retry path of this process, so an unexpected
            # error is logged with its traceback and the loop goes on.
            except Exception:
                logger.exception(
                    "Outbox delivery pass failed; next pass in %.1f s",
                    self.poll_interval,
                )
            try:
                await asyncio.wait_for(stop.wait(), self.poll_interval)
            except TimeoutError:
                pass
        logger.info("Outbox delivery loop stopped (worker %s)", self.worker_id)

    async def _deliver_one(self, claim: Claim) -> bool | None:
        """Claim a row with `claim` and send it; None when nothing was claimed."""
        if self.pool is None:
            return None
        async with self.pool.connection() as connection:
            async with session_scope() as session:
                row = await claim(session)
            if row is None:
                return None
            deadline = asyncio.timeout(self.send_time_limit)
            try:
                async with deadline:
                    result = await connection.send(
                        row.sender, row.recipients, row.message
                    )
            # Any error is recorded on the row: one message that the client cannot
            # send at all, say with an address it cannot encode, must not stop the
            # delivery of the others.
            except Exception as error:
                failure: Exception = error
                if deadline.expired():
                    failure = TimeoutError(
                        f"the send took longer than {self.send_time_limit:g} s, "
                        "half of OUTBOX_LEASE"
                    )
                await self._record_failure(row, failure)
                return True
        await self._record_sent(row, result)
        return True

    def _claim_by_id(self, id_: int) -> Claim:
        async def claim(session: AsyncSession) -> OutboxMessage | None:
            return await self._claim(session, id_)

        return claim

    async def _claim_next_due(self, session: AsyncSession) -> OutboxMessage | None:
        now = utcnow()
        due = select(OutboxMessage.id).where(_claimable(now))
        due = due.order_by(OutboxMessage.next_attempt_at, OutboxMessage.id)
        if session.get_bind().dialect.name == "postgresql":
            # SKIP LOCKED lets every worker pass over rows that another worker is
            # claiming right now, so workers do not queue behind each other.
            locked = await session.execute(
                due.limit(1).with_for_update(skip_locked=True)
            )
            id_ = locked.scalar_one_or_none()
            if id_ is None:
                await session.commit()
                return None
            return await self._claim(session, id_)

        # SQLite ignores FOR UPDATE, so the conditional UPDATE in _claim decides.
        # Of two workers that read the same candidate, one changes the row, and
        # the other gets a row count of 0 and tries the next candidate.
        candidates = list(
            (await session.execute(due.limit(_SQLITE_CANDIDATES))).scalars()
        )
        await session.commit()
        for id_ in candidates:
            row = await self._claim(session, id_)
            if row is not None:
                return row
        return None

    async def _claim(self, session: AsyncSession, id_: int) -> OutboxMessage | None:
        now = utcnow()
        token = uuid.uuid4().hex
        result = await session.execute(
            update(OutboxMessage)
            .where(OutboxMessage.id == id_, _claimable(now))
            .values(
                status=OutboxStatus.SENDING.value,
                attempts=OutboxMessage.attempts + 1,
                # A row still marked as sending had a worker that stopped before it
                # recorded the outcome; the relay may or may not have accepted it.
                last_error=case(
                    (
                        OutboxMessage.status == OutboxStatus.SENDING.value,
                        literal(_TAKEOVER)
                        + func.coalesce(OutboxMessage.lease_owner, "unknown")
                        + literal(" expired before it recorded the outcome"),
                    ),
                    else_=OutboxMessage.last_error,
                ),
                lease_owner=self.worker_id,
                lease_token=token,
                lease_expires_at=now + self.lease,
            )
            .execution_options(synchronize_session=False)
        )
        await session.commit()
        if _rowcount(result) != 1:
            return None
        self.claimed_any = True
        row = await session.get(OutboxMessage, id_, populate_existing=True)
        if row is None or row.lease_token != token:
            return None
        if row.last_error is not None and row.last_error.startswith(_TAKEOVER):
            logger.warning(
                "Outbox %d attempt %d: %s", row.id, row.attempts, row.last_error
            )
        return row

    async def _record_sent(self, row: OutboxMessage, result: SendResult) -> None:
        async with session_scope() as session:
            updated = await session.execute(
                update(OutboxMessage)
                .where(
                    OutboxMessage.id == row.id,
                    OutboxMessage.lease_token == row.lease_token,
                )
                .values(
                    status=OutboxStatus.SENT.value,
                    sent_at=utcnow(),
                    refused_recipients=result.refused or None,
                    lease_owner=None,
                    lease_token=None,
                    lease_expires_at=None,
                )
                .execution_options(synchronize_session=False)
            )
            await session.commit()
        if _rowcount(updated) != 1:
            logger.warning(
                "Outbox %d was sent, but its lease had expired and another worker "
                "may send it again",
                row.id,
            )
        if result.refused:
            logger.warning(
                "Outbox %d attempt %d: the relay refused some recipients: %s",
                row.id,
                row.attempts,
                "; ".join(
                    f"{address}: {reply}" for address, reply in result.refused.items()
                ),
            )
        logger.info(
            "Outbox %d sent to %s (%r), attempt %d, user %s: %s",
            row.id,
            ", ".join(row.recipients),
            row.subject,
            row.attempts,
            row.user_id,
            result.reply,
        )

    async def _record_failure(self, row: OutboxMessage, error: BaseException) -> None:
        failure = classify(error)
        now = utcnow()
        recipients = ", ".join(row.recipients)
        gave_up = ""
        if not failure.transient:
            gave_up = "permanent failure"
        elif row.attempts >= self.max_attempts:
            gave_up = f"gave up after {row.attempts} attempts"
        elif now - row.created_at >= self.max_age:
            gave_up = f"gave up after {now - row.created_at} in the outbox"

        values: dict[str, Any] = {
            "last_error": failure.description,
            "lease_owner": None,
            "lease_token": None,
            "lease_expires_at": None,
        }
        delay = 0.0
        if gave_up:
            values["status"] = OutboxStatus.FAILED.value
        else:
            delay = self._retry_delay(row.attempts)
            values["status"] = OutboxStatus.PENDING.value
            values["next_attempt_at"] = now + timedelta(seconds=delay)

        async with session_scope() as session:
            await session.execute(
                update(OutboxMessage)
                .where(
                    OutboxMessage.id == row.id,
                    OutboxMessage.lease_token == row.lease_token,
                )
                .values(**values)
                .execution_options(synchronize_session=False)
            )
            await session.commit()

        if gave_up:
            logger.error(
                "Outbox %d attempt %d to %s (%r) failed, SMTP code %s: %s; %s",
                row.id,
                row.attempts,
                recipients,
                row.subject,
                failure.code,
                failure.description,
                gave_up,
            )
        else:
            logger.warning(
                "Outbox %d attempt %d to %s (%r) failed, SMTP code %s: %s; "
                "next attempt in %.1f s",
                row.id,
                row.attempts,
                recipients,
                row.subject,
                failure.code,
                failure.description,
                delay,
            )

    def _retry_delay(self, attempts: int) -> float:
        # Exponential backoff with jitter, so the retries of many messages that
        # failed together spread out instead of hitting the relay at once.
        # The exponent stops growing long before a float could overflow.
        doubling = 2.0 ** min(attempts - 1, 64)
        ceiling = min(self.retry_max_delay, self.retry_delay * doubling)
        return random.uniform(ceiling / 2, ceiling)

    async def _release_leases(self, session: AsyncSession) -> int:
        result = await session.execute(
            update(OutboxMessage)
            .where(
                OutboxMessage.status == OutboxStatus.SENDING.value,
                OutboxMessage.lease_owner == self.worker_id,
            )
            .values(
                status=OutboxStatus.PENDING.value,
                next_attempt_at=utcnow(),
                lease_owner=None,
                lease_token=None,
                lease_expires_at=None,
            )
            .execution_options(synchronize_session=False)
        )
        await session.commit()
        return _rowcount(result)


def _rowcount(result: Result[Any]) -> int:
    # An UPDATE returns a CursorResult, whose row count the generic type hides.
    return cast(CursorResult[Any], result).rowcount


def _claimable(now: datetime) -> ColumnElement[bool]:
    return or_(
        and_(
            OutboxMessage.status == OutboxStatus.PENDING.value,
            OutboxMessage.next_attempt_at <= now,
        ),
        and_(
            OutboxMessage.status == OutboxStatus.SENDING.value,
            OutboxMessage.lease_expires_at < now,
        ),
    )


async def count_pending(session: AsyncSession) -> int:
    waiting = (OutboxStatus.PENDING.value, OutboxStatus.SENDING.value)
    result = await session.execute(
        select(func.count())
        .select_from(OutboxMessage)
        .where(OutboxMessage.status.in_(waiting))
    )
    return result.scalar_one()


async def outbox_stats(session: AsyncSession) -> dict[str, Any]:
    """Count pending, failed and stuck rows, and give the oldest pending row's age.

    Pending includes the rows being sent. Stuck rows are being sent by a worker
    whose lease has expired.
    """
    waiting = (OutboxStatus.PENDING.value, OutboxStatus.SENDING.value)
    pending, oldest = (
        await session.execute(
            select(func.count(), func.min(OutboxMessage.created_at)).where(
                OutboxMessage.status.in_(waiting)
            )
        )
    ).one()
    failed = (
        await session.execute(
            select(func.count())
            .select_from(OutboxMessage)
            .where(OutboxMessage.status == OutboxStatus.FAILED.value)
        )
    ).scalar_one()
    stuck = (
        await session.execute(
            select(func.count())
            .select_from(OutboxMessage)
            .where(
                OutboxMessage.status == OutboxStatus.SENDING.value,
                OutboxMessage.lease_expires_at < utcnow(),
            )
        )
    ).scalar_one()
    age = None
    if oldest is not None:
        # SQLite returns the aggregate as text or a naive value, in UTC.
        if isinstance(oldest, str):
            oldest = datetime.fromisoformat(oldest)
        if oldest.tzinfo is None:
            oldest = oldest.replace(tzinfo=UTC)
        age = round((utcnow() - oldest).total_seconds(), 1)
    return {
        "pending": pending,
        "failed": failed,
        # Rows whose worker stopped mid-send; a delivery loop takes them over.
        "stuck": stuck,
        "oldest_pending_age_seconds": age,
    }
