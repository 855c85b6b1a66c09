"""Signup, login and email confirmation."""

from quart_app.auth.routes import bp

__all__ = ("bp",)
