"""Command-line tools: ``quart --app quart_app outbox ...`` and ``send-test-email``."""

import asyncio
import signal
from collections.abc import Awaitable, Callable
from typing import Any

import click
from email_validator import EmailNotValidError, validate_email
from quart import Quart
from quart.cli import ScriptInfo
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError

from quart_app.db import describe_error, get_session, session_scope
from quart_app.email import send_email
from quart_app.errors import OutboxMessageNotFailed, OutboxMessageNotFound
from quart_app.models import OutboxMessage, OutboxStatus
from quart_app.outbox import retry_message
from quart_app.outbox.delivery import Outbox, outbox_stats

outbox_cli = click.Group("outbox", help="Inspect and deliver the email outbox.")


def _run(work: Callable[[Quart], Awaitable[Any]], *, deliver_loop: bool = False) -> Any:
    """Start the app as a server would, run `work`, then shut the app down.

    Startup opens the database and the SMTP pool (and, in development, the
    mailbox). The delivery loop runs only when `deliver_loop` is true. Shutdown
    waits for the sends that `work` queued.
    """
    app = click.get_current_context().ensure_object(ScriptInfo).load_app()
    app.config["OUTBOX_WORKER"] = deliver_loop

    async def main() -> Any:
        await app.startup()
        try:
            async with app.app_context():
                return await work(app)
        finally:
            await app.shutdown()

    try:
        return asyncio.run(main())
    except (SQLAlchemyError, OSError) as error:
        raise click.ClickException(
            f"the database failed: {describe_error(error)}. If its tables are "
            "missing, run `alembic upgrade head` first."
        ) from None


@outbox_cli.command("status")
def status_command() -> None:
    """Print the outbox counts by status and list the failed messages."""

    async def work(_app: Quart) -> None:
        async with session_scope() as session:
            counts = dict(
                (
                    await session.execute(
                        select(OutboxMessage.status, func.count()).group_by(
                            OutboxMessage.status
                        )
                    )
                ).all()
            )
            stats = await outbox_stats(session)
            failed = (
                await session.execute(
                    select(OutboxMessage)
                    .where(OutboxMessage.status == OutboxStatus.FAILED.value)
                    .order_by(OutboxMessage.id.desc())
                    .limit(50)
                )
            ).scalars()
            for status in OutboxStatus:
                click.echo(f"{status.value:>8}: {counts.get(status.value, 0)}")
            if stats["stuck"]:
                click.echo(
                    f"stuck: {stats['stuck']} (their worker stopped mid-send; a "
                    "delivery loop takes them over)"
                )
            age = stats["oldest_pending_age_seconds"]
            if age is not None:
                click.echo(f"oldest pending message: {age:.0f} s old")
            for row in failed:
                click.echo(
                    f"failed {row.id}: to {', '.join(row.recipients)} {row.subject!r}, "
                    f"{row.attempts} attempts, last error: {row.last_error}"
                )

    _run(work)


@outbox_cli.command("send-pending")
@click.option(
    "--once",
    is_flag=True,
    help="Send what is due now and exit, instead of running until SIGTERM or Ctrl+C.",
)
def send_pending_command(once: bool) -> None:
    """Deliver pending messages: a delivery worker for a host that serves no pages.

    Several of these, and the serving processes, may run against one database:
    each message is claimed by one worker at a time.
    """

    async def work(app: Quart) -> None:
        outbox: Outbox = app.extensions["outbox"]
        if once:
            claimed = await outbox.deliver_due()
            click.echo(f"claimed {claimed} messages")
            return
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signal_number in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signal_number, stop.set)
        await outbox.run(stop)

    _run(work)


@outbox_cli.command("retry")
@click.argument("message_id", type=click.IntRange(1, 2**31 - 1))
def retry_command(message_id: int) -> None:
    """Queue failed message MESSAGE_ID for delivery again, and send it now."""

    async def work(_app: Quart) -> None:
        async with session_scope() as session:
            await retry_message(session=session, message_id=message_id)
            await session.commit()

    try:
        _run(work)
    except (OutboxMessageNotFound, OutboxMessageNotFailed) as error:
        raise click.ClickException(str(error)) from None
    click.echo(f"queued outbox message {message_id} for delivery")


@click.command("send-test-email")
@click.argument("address")
def send_test_email_command(address: str) -> None:
    """Send a test email to ADDRESS through the relay and report what happened."""
    try:
        # As at signup, the part before the @ must be ASCII, because anything
        # else needs SMTPUTF8, which many relays lack.
        valid = validate_email(
            address, check_deliverability=False, allow_smtputf8=False
        )
    except EmailNotValidError as error:
        raise click.BadParameter(str(error), param_hint="ADDRESS") from None
    # A non-ASCII domain is sent in its ASCII (IDNA) form.
    address = valid.ascii_email or valid.normalized

    async def work(app: Quart) -> OutboxMessage | None:
        row = await send_email(address, "Test email", "email/test")
        await get_session().commit()
        # The commit queued the send as a background task. Waiting for it here,
        # rather than in the shutdown with its timeout, gives a slow relay the
        # full MAIL_TIMEOUT for each step.
        await asyncio.gather(*list(app.background_tasks))
        async with session_scope() as session:
            return await session.get(OutboxMessage, row.id)

    row = _run(work)
    if row is None:
        raise click.ClickException("the test email was not written to the outbox")
    if row.status == OutboxStatus.SENT.value:
        click.echo(f"test email {row.id} sent to {address}")
        return
    if row.status == OutboxStatus.FAILED.value:
        click.echo(
            f"test email {row.id} to {address} failed: {row.last_error}", err=True
        )
    else:
        click.echo(
            f"test email {row.id} to {address} not sent yet: {row.last_error}. It "
            "stays in the outbox, and the delivery loop retries it.",
            err=True,
        )
    raise SystemExit(1)


def init_app(app: Quart) -> None:
    app.cli.add_command(outbox_cli)
    app.cli.add_command(send_test_email_command)
