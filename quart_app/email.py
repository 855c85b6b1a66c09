"""Email: render both parts in the view, deliver over aiosmtplib in the background.

`send_email` renders the text and HTML templates inside the request, builds the
message and writes it to the outbox in the request's database session. When the
view commits, a background task started with `app.add_background_task` sends it
in the app context, so the view never waits for SMTP and no thread is started.
"""

import ipaddress
import ssl
from email.message import EmailMessage
from email.utils import formatdate, make_msgid, parseaddr
from typing import Any
from urllib.parse import urlsplit

from quart import Quart, current_app, render_template
from sqlalchemy.ext.asyncio import AsyncSession

from quart_app.db import get_session
from quart_app.models import OutboxMessage
from quart_app.outbox import enqueue


async def send_email(
    to: str,
    subject: str,
    template: str,
    *,
    session: AsyncSession | None = None,
    **context: Any,
) -> OutboxMessage:
    """Render `template` and queue it for `to` in `session`'s transaction.

    `session` is the request's database session unless given.

    `template` names a pair of templates without extension, such as
    ``"email/confirm"``: ``email/confirm.txt`` becomes the text/plain part and
    ``email/confirm.html`` the text/html part. The subject gets
    MAIL_SUBJECT_PREFIX in front of it. A ``user`` in `context` is recorded on
    the outbox row, for the logs.

    The email goes out only once the caller commits the session, and not at all
    if it rolls back. Delivery errors are retried and logged, never raised here.

    Raises:
        ValueError: `to` or `subject` contains a line break, which could add a
            header.
    """
    text = await render_template(f"{template}.txt", **context)
    html = await render_template(f"{template}.html", **context)
    message = build_message(to=to, subject=subject, text=text, html=html)
    user = context.get("user")
    user_id = getattr(user, "id", None)
    return await enqueue(
        message,
        session=session if session is not None else get_session(),
        user_id=user_id if isinstance(user_id, int) else None,
    )


def build_message(*, to: str, subject: str, text: str, html: str) -> EmailMessage:
    """Build a multipart/alternative message from the app's mail settings."""
    config = current_app.config
    sender = config["MAIL_DEFAULT_SENDER"]
    prefix = config["MAIL_SUBJECT_PREFIX"]

    if not to.isascii():
        raise ValueError(f"cannot send to {to!r}: the address is not ASCII")
    message = EmailMessage()
    # The default policy raises ValueError on a CR or LF in a header value, so
    # no user data can end a header and start another one.
    message["From"] = sender
    message["To"] = to
    message["Subject"] = f"{prefix} {subject}" if prefix else subject
    message["Date"] = formatdate(usegmt=True)
    message["Message-ID"] = make_msgid(domain=_domain_of(sender))
    message.set_content(text)
    message.add_alternative(html, subtype="html")
    return message


def smtp_options() -> dict[str, Any] | None:
    """Return the keyword arguments for `aiosmtplib.send`, or None with no relay.

    In development with no MAIL_SERVER the relay is the development mailbox.
    """
    config = current_app.config
    mailbox = current_app.extensions.get("dev_mailbox")
    if mailbox is not None and mailbox.port is not None:
        return {
            "hostname": mailbox.host,
            "port": mailbox.port,
            "start_tls": False,
            "timeout": config["MAIL_TIMEOUT"],
            "local_hostname": "localhost",
        }
    if not config["MAIL_SERVER"]:
        return None
    options = {
        "hostname": config["MAIL_SERVER"],
        "port": config["MAIL_PORT"],
        "use_tls": config["MAIL_USE_SSL"],
        "start_tls": config["MAIL_USE_TLS"],
        "username": config["MAIL_USERNAME"],
        "password": config["MAIL_PASSWORD"],
        "timeout": config["MAIL_TIMEOUT"],
        "local_hostname": config["MAIL_LOCAL_HOSTNAME"],
    }
    if config["MAIL_USE_SSL"] or config["MAIL_USE_TLS"]:
        options["tls_context"] = current_app.extensions["smtp_tls_context"]
    return options


def init_app(app: Quart) -> None:
    """Prepare what every send needs once, so no send starts a thread.

    aiosmtplib looks up the local host name and builds its TLS context in a
    worker thread unless it is given both, so both are made here.
    """
    if app.config["MAIL_LOCAL_HOSTNAME"] is None:
        app.config["MAIL_LOCAL_HOSTNAME"] = _ehlo_name(app.config["APP_BASE_URL"])

    @app.before_serving
    async def _load_tls_context() -> None:
        if app.config["MAIL_USE_SSL"] or app.config["MAIL_USE_TLS"]:
            # The relay's certificate is checked against the system's trust
            # store, or against MAIL_CA_FILE for a relay with a private CA.
            ca_file = app.config["MAIL_CA_FILE"]
            app.extensions["smtp_tls_context"] = ssl.create_default_context(
                cafile=str(ca_file) if ca_file is not None else None
            )


def _ehlo_name(base_url: str) -> str:
    host = urlsplit(base_url).hostname or "localhost"
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return host
    # An EHLO name must be a domain or a bracketed address literal.
    return "localhost"


def _domain_of(sender: str) -> str:
    _, address = parseaddr(sender)
    return address.rpartition("@")[2] or "localhost"
