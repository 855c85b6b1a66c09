"""A bounded pool of SMTP connections, reused for consecutive messages.

At most MAIL_MAX_CONNECTIONS sessions are open at once, so a burst of signups
queues for a connection instead of opening one each. A connection goes back to
the pool after a send and is checked with NOOP before its next message.
"""

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiosmtplib

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SendResult:
    """The relay's reply to an accepted message, and the recipients it refused."""

    reply: str
    # Recipients the relay refused while it accepted the others: address -> reply.
    refused: dict[str, str]


class SMTPPool:
    def __init__(
        self, options: dict[str, Any], *, max_connections: int, max_messages: int
    ) -> None:
        self.options = options
        self.max_messages = max_messages
        self._slots = asyncio.Semaphore(max_connections)
        self._idle: list[_Connection] = []
        self._open: set[_Connection] = set()

    @asynccontextmanager
    async def connection(self) -> AsyncIterator["_Connection"]:
        """Wait for a free slot and yield a connection, reused if one is idle."""
        async with self._slots:
            connection = self._idle.pop() if self._idle else _Connection(self)
            self._open.add(connection)
            try:
                yield connection
            except BaseException:
                # Cancelled or failed mid-conversation: a QUIT could wait for a
                # reply that never comes, so the connection is dropped.
                connection.abort()
                raise
            finally:
                self._open.discard(connection)
            if connection.broken:
                connection.abort()
            elif connection.sent >= self.max_messages:
                await connection.close()
            else:
                self._idle.append(connection)

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for connection in idle:
            await connection.close()
        for connection in list(self._open):
            connection.abort()


class _Connection:
    def __init__(self, pool: SMTPPool) -> None:
        self.pool = pool
        self.client: aiosmtplib.SMTP | None = None
        self.sent = 0
        # True from the start of a send until the relay accepts the message, so a
        # connection left in an unknown state is never reused.
        self.broken = False

    async def send(
        self, sender: str, recipients: list[str], message: bytes
    ) -> SendResult:
        """Send one message, connecting first unless a live connection is at hand.

        Raises:
            aiosmtplib.SMTPException, OSError: the relay rejected the message or
                could not be reached. The connection is then not reused.
        """
        self.broken = True
        client = await self._ready_client()
        refused, reply = await client.sendmail(sender, recipients, message)
        self.sent += 1
        self.broken = False
        return SendResult(
            # aiosmtplib raises SMTPDataError for any other reply code to DATA.
            reply=f"250 {reply}",
            refused={
                address: f"{response.code} {response.message}"
                for address, response in refused.items()
            },
        )

    async def _ready_client(self) -> aiosmtplib.SMTP:
        if self.client is not None and self.client.is_connected:
            try:
                await self.client.noop()
                return self.client
            except (aiosmtplib.SMTPException, OSError) as error:
                # The relay closed an idle connection; nothing of the message has
                # been sent on it, so a fresh connection is safe.
                logger.debug("Idle SMTP connection is gone, reconnecting: %s", error)
                await self.close()
        self.client = aiosmtplib.SMTP(**self.pool.options)
        self.sent = 0
        await self.client.connect()
        return self.client

    async def close(self) -> None:
        """Say QUIT and close; for a connection in a known, idle state."""
        client, self.client = self.client, None
        if client is None or not client.is_connected:
            return
        try:
            await client.quit()
        except (aiosmtplib.SMTPException, OSError):
            client.close()

    def abort(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            client.close()
