"""The development mailbox: an aiosmtpd server on 127.0.0.1 that keeps every message.

In development with no MAIL_SERVER, the app starts this server on its own event loop
when serving starts, and sends to it over aiosmtplib, so the real SMTP path runs.
Each message is saved as a file in the instance folder, which lets messages survive
a restart and lets every hypercorn worker list what any worker received.
"""

import asyncio
import logging
import os
import re
import time
import uuid
from dataclasses import dataclass
from email import message_from_bytes, policy
from email.message import EmailMessage
from email.parser import BytesHeaderParser
from pathlib import Path

from aiosmtpd.smtp import SMTP, Envelope, Session
from quart import Quart

logger = logging.getLogger(__name__)

_ID_PATTERN = re.compile(r"\A[0-9]{19,20}-[0-9a-f]{32}\Z")
MAX_LISTED = 500
_HEADER_BYTES = 64 * 1024


def displayable(text: str) -> str:
    """Return `text` with the raw bytes that the email parser kept decoded as UTF-8.

    The parser keeps a byte it cannot decode, such as a bare Latin-1 byte in a
    header, as a lone surrogate, which no page can encode. Those bytes are read
    as UTF-8 here, and the invalid ones become U+FFFD.
    """
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


@dataclass(frozen=True)
class StoredMessage:
    id: str
    message: EmailMessage

    def header(self, name: str) -> str:
        """Return the header's text, or its raw form if it does not parse."""
        try:
            return displayable(str(self.message.get(name, "")))
        except Exception:  # noqa: BLE001 - any sender may write any header
            for raw_name, raw_value in self.message.raw_items():
                if raw_name.lower() == name.lower():
                    return displayable(str(raw_value))
            return ""


class MailboxStore:
    """The folder of received messages, one ``.eml`` file each."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def save(self, content: bytes, *, mail_from: str, rcpt_tos: list[str]) -> str:
        self.folder.mkdir(parents=True, exist_ok=True)
        # The time comes first so names sort oldest to newest.
        message_id = f"{time.time_ns():020d}-{uuid.uuid4().hex}"
        envelope = (
            f"X-Envelope-From: {mail_from}\r\nX-Envelope-To: {', '.join(rcpt_tos)}\r\n"
        ).encode()
        partial = self.folder / f".{message_id}.tmp"
        partial.write_bytes(envelope + content)
        # The rename is atomic, so a listing never reads half a message.
        os.replace(partial, self.folder / f"{message_id}.eml")
        return message_id

    def list(self, limit: int = MAX_LISTED) -> list[StoredMessage]:
        """Return the newest `limit` messages, newest first."""
        try:
            names = sorted(
                (entry.name for entry in os.scandir(self.folder)), reverse=True
            )
        except FileNotFoundError:
            return []
        messages: list[StoredMessage] = []
        for name in names:
            if len(messages) == limit:
                break
            stem, _, extension = name.rpartition(".")
            if extension == "eml" and _ID_PATTERN.match(stem):
                stored = self._read(stem, headers_only=True)
                if stored is not None:
                    messages.append(stored)
        return messages

    def get(self, message_id: str) -> StoredMessage | None:
        if not _ID_PATTERN.match(message_id):
            return None
        return self._read(message_id, headers_only=False)

    def _read(self, message_id: str, *, headers_only: bool) -> StoredMessage | None:
        path = self.folder / f"{message_id}.eml"
        try:
            with path.open("rb") as handle:
                # The listing needs only the headers, so a huge message costs it
                # no more than its first bytes.
                content = handle.read(_HEADER_BYTES if headers_only else -1)
        except FileNotFoundError:
            return None
        if headers_only:
            message = BytesHeaderParser(policy=policy.default).parsebytes(content)
        else:
            message = message_from_bytes(content, policy=policy.default)
        return StoredMessage(message_id, message)


class _StoringHandler:
    def __init__(self, store: MailboxStore) -> None:
        self.store = store

    async def handle_DATA(  # noqa: N802 - the name aiosmtpd calls
        self, server: SMTP, session: Session, envelope: Envelope
    ) -> str:
        content = envelope.original_content or b""
        message_id = self.store.save(
            content,
            mail_from=envelope.mail_from or "",
            rcpt_tos=list(envelope.rcpt_tos),
        )
        logger.info(
            "Development mailbox received %s for %s",
            message_id,
            ", ".join(envelope.rcpt_tos),
        )
        return "250 Message accepted for delivery"


class DevMailbox:
    """The server and its store, started and stopped with the app's serving."""

    host = "127.0.0.1"

    def __init__(self, store: MailboxStore) -> None:
        self.store = store
        self.port: int | None = None
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        handler = _StoringHandler(self.store)
        server = await loop.create_server(
            lambda: SMTP(handler, hostname="dev-mailbox.localhost"),
            host=self.host,
            port=0,
        )
        self._server = server
        self.port = server.sockets[0].getsockname()[1]
        logger.info(
            "Development mailbox listening on %s:%s; read it at /dev/mailbox",
            self.host,
            self.port,
        )

    async def stop(self) -> None:
        server = self._server
        self._server = None
        self.port = None
        if server is not None:
            server.close()
            await server.wait_closed()


def init_app(app: Quart) -> None:
    """Run the mailbox while the app serves and make `send_email` deliver to it."""
    mailbox = DevMailbox(MailboxStore(Path(app.instance_path) / "mailbox"))
    app.extensions["dev_mailbox"] = mailbox
    app.before_serving(mailbox.start)
    app.after_serving(mailbox.stop)
