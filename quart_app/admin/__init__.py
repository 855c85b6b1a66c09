"""The administrator's pages: the email outbox, with a retry for failed messages."""

from quart_app.admin.routes import bp

__all__ = ("bp",)
