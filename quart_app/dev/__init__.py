"""The development mailbox and its pages, active only in development."""

from quart_app.dev.mailbox import DevMailbox, MailboxStore, init_app
from quart_app.dev.routes import bp

__all__ = ("DevMailbox", "MailboxStore", "bp", "init_app")
