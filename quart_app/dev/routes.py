import re

from markupsafe import Markup, escape
from quart import Blueprint, abort, current_app, render_template
from quart.typing import ResponseReturnValue

from quart_app.dev.mailbox import DevMailbox

bp = Blueprint("dev", __name__, url_prefix="/dev")

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
    text_part = message.get_body(preferencelist=("plain",))
    html_part = message.get_body(preferencelist=("html",))
    text = text_part.get_content() if text_part is not None else None
    html = html_part.get_content() if html_part is not None else None
    return await render_template(
        "dev/message.html",
        stored=stored,
        headers=list(message.items()),
        text=_link_urls(text) if text is not None else None,
        html=_frame_document(html) if html is not None else None,
    )


def _mailbox() -> DevMailbox:
    return current_app.extensions["dev_mailbox"]


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
