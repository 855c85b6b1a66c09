import ipaddress
import re
from email.message import EmailMessage

from markupsafe import Markup, escape
from quart import Blueprint, abort, current_app, render_template, request
from quart.typing import ResponseReturnValue

from quart_app.dev.mailbox import DevMailbox, displayable

bp = Blueprint("dev", __name__, url_prefix="/dev")


@bp.before_request
async def _loopback_only() -> None:
    # The mailbox shows every confirmation link, so a development server bound
    # to a public address must not hand it to other machines. Quart reports
    # "<local>" when the server gives no client address (a Unix socket, or the
    # test client), which is local too.
    address = request.remote_addr
    if address == "<local>":
        return
    try:
        ip = ipaddress.ip_address(address or "")
    except ValueError:
        abort(404)
    # An IPv6 socket reports an IPv4 client as ::ffff:a.b.c.d.
    mapped = getattr(ip, "ipv4_mapped", None)
    loopback = ip.is_loopback or (mapped is not None and mapped.is_loopback)
    if not loopback:
        abort(404)


_URL_PATTERN = re.compile(r"https?://[^\s<>\"']+")
_HEAD_PATTERN = re.compile(r"<head(\s[^>]*)?>", re.IGNORECASE)


@bp.get("/mailbox")
async def mailbox() -> ResponseReturnValue:
    messages = _mailbox().store.list()
    return await render_template("dev/mailbox.html", messages=messages)


@bp.get("/mailbox/<message_id>")
async def mailbox_message(message_id: str) -> ResponseReturnValue:
    stored = _mailbox().store.get(message_id)
    if stored is None:
        abort(404)
    message = stored.message
    text = _part_text(message, "plain")
    html = _part_text(message, "html")
    return await render_template(
        "dev/message.html",
        stored=stored,
        # The raw values, because a header that does not parse must still show.
        headers=[
            (displayable(name), displayable(str(value)))
            for name, value in message.raw_items()
        ],
        text=_link_urls(text) if text is not None else None,
        html=_frame_document(html) if html is not None else None,
    )


def _part_text(message: EmailMessage, subtype: str) -> str | None:
    """Return the decoded text of the message's text/`subtype` part, if any.

    A part in a charset Python does not know is decoded as UTF-8 with
    replacement characters, so a malformed message still shows.
    """
    try:
        part = message.get_body(preferencelist=(subtype,))
    except Exception:  # noqa: BLE001 - any sender may write any structure
        return None
    if part is None:
        return None
    try:
        content: str = part.get_content()
    except (LookupError, ValueError, AssertionError):
        payload = part.get_payload(decode=True)
        if isinstance(payload, bytes):
            return payload.decode("utf-8", errors="replace")
        return displayable(str(part.get_payload()))
    return displayable(content)


def _mailbox() -> DevMailbox:
    mailbox: DevMailbox = current_app.extensions["dev_mailbox"]
    return mailbox


def _link_urls(text: str) -> Markup:
    """Escape `text` and turn each http(s) URL in it into a link."""
    pieces = []
    position = 0
    for match in _URL_PATTERN.finditer(text):
        url = match.group(0)
        pieces.append(escape(text[position : match.start()]))
        pieces.append(Markup('<a href="{0}">{0}</a>').format(url))
        position = match.end()
    pieces.append(escape(text[position:]))
    return Markup("").join(pieces)


def _frame_document(html: str) -> str:
    # A base target sends clicked links to the whole tab instead of the small
    # sandboxed frame. It goes inside <head> when there is one, because a tag
    # before the doctype would switch the page to quirks mode.
    base = '<base target="_top">'
    head = _HEAD_PATTERN.search(html)
    if head is None:
        return base + html
    return html[: head.end()] + base + html[head.end() :]
