"""The home page and the health check."""

from quart_app.main.routes import bp

__all__ = ("bp",)
