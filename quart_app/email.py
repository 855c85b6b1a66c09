"""Email: render both parts in the view, send over aiosmtplib in a background task.

`send_email` renders the text and HTML templates inside the request, builds the
message, and hands it to `app.add_background_task`, so the view returns without
waiting for SMTP and no thread is started. The task runs in the app context and
logs one ERROR line if the relay rejects the message or cannot be reached.
"""

import ipaddress
import logging
import ssl
from email.message import EmailMessage
from email.utils import formatdate, make_msgid, parseaddr
from typing import Any
from urllib.parse import urlsplit

import aiosmtplib
from quart import Quart, current_app, render_template

logger = logging.getLogger(__name__)


async def send_email(
    to: str, subject: str, template: str, **context: object
) -> EmailMessage:
    """Render `template` and send it to `to` in the background.

    `template` names a pair of templates without extension, such as
    ``"email/confirm"``: ``email/confirm.txt`` becomes the text/plain part and
    ``email/confirm.html`` the text/html part. The subject gets
    MAIL_SUBJECT_PREFIX in front of it.

    Returns the message, already queued. Delivery errors are logged, never raised.

    Raises:
        ValueError: `to` or `subject` contains a line break, which could add a
            header.
    """
    text = await render_template(f"{template}.txt", **context)
    html = await render_template(f"{template}.html", **context)
    message = build_message(to=to, subject=subject, text=text, html=html)
    current_app.add_background_task(deliver, message)
    return message


def build_message(*, to: str, subject: str, text: str, html: str) -> EmailMessage:
    """Build a multipart/alternative message from the app's mail settings."""
    config = current_app.config
    sender = config["MAIL_DEFAULT_SENDER"]
    prefix = config["MAIL_SUBJECT_PREFIX"]

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


async def deliver(message: EmailMessage) -> bool:
    """Send `message` to the configured relay; return whether it was accepted.

    A failure is logged as one ERROR line with the recipients, the subject and the
    relay's reply; the exception is not raised, so the app goes on serving.
    """
    options = smtp_options()
    recipients = message["To"]
    subject = message["Subject"]
    if options is None:
        logger.error(
            "Email to %s (%r) not sent: MAIL_SERVER is not set", recipients, subject
        )
        return False
    try:
        refused, reply = await aiosmtplib.send(message, **options)
    except aiosmtplib.SMTPRecipientsRefused as error:
        replies = "; ".join(
            f"{r.recipient}: {r.code} {r.message}" for r in error.recipients
        )
        logger.error(
            "Email to %s (%r) failed: refused %s", recipients, subject, replies
        )
        return False
    except aiosmtplib.SMTPResponseException as error:
        logger.error(
            "Email to %s (%r) failed: %s %s",
            recipients,
            subject,
            error.code,
            error.message,
        )
        return False
    except (aiosmtplib.SMTPException, OSError) as error:
        logger.error(
            "Email to %s (%r) failed: %s:%s did not accept it: %s",
            recipients,
            subject,
            options["hostname"],
            options["port"],
            error or type(error).__name__,
        )
        return False

    if refused:
        partial = "; ".join(
            f"{address}: {code} {text}" for address, (code, text) in refused.items()
        )
        logger.warning("Email %r was refused for some recipients: %s", subject, partial)
    logger.info("Email to %s (%r) sent: %s", recipients, subject, reply)
    return True


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
            app.extensions["smtp_tls_context"] = ssl.create_default_context()


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
