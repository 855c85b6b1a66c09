"""An async Quart app that signs users up and emails them a confirmation link."""

import ipaddress
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from pydantic import SecretStr
from quart import Quart, g, redirect, render_template, request, url_for
from quart.typing import ResponseReturnValue
from quart_auth import QuartAuth, Unauthorized
from werkzeug.exceptions import HTTPException

from quart_app import api, db, email, outbox, passwords, serving
from quart_app.admin import bp as admin_bp
from quart_app.auth import bp as auth_bp
from quart_app.config import (
    Settings,
    load_settings,
    resolve_database_url,
    resolve_secret_key,
)
from quart_app.dev import bp as dev_bp, init_app as init_dev_mailbox
from quart_app.errors import ConfigError
from quart_app.main import bp as main_bp
from quart_app.models import normalize_email
from quart_app.outbox.cli import init_app as init_cli

__all__ = ("create_app",)

# The address hypercorn.toml binds, used for links when APP_BASE_URL is unset.
DEVELOPMENT_BASE_URL = "http://127.0.0.1:8000"


def create_app(overrides: dict[str, Any] | None = None) -> Quart:
    """Build the app from the environment, with `overrides` taking precedence.

    Nothing connects here: the database engine and, in development, the mailbox
    server start when serving starts.

    Raises:
        ConfigError: a setting is missing or invalid.
    """
    settings = load_settings(overrides)
    app = Quart(
        __name__,
        instance_path=str(settings.INSTANCE_PATH.resolve())
        if settings.INSTANCE_PATH
        else None,
    )
    instance_path = Path(app.instance_path)
    try:
        _configure(app, settings, instance_path)
    except OSError as error:
        raise ConfigError(
            f"Invalid setting INSTANCE_PATH={str(instance_path)!r}: the folder "
            f"cannot be created or written ({error.strerror}): choose a writable one."
        ) from None
    app.logger.setLevel(settings.LOG_LEVEL)

    # First, so that its SIGTERM handler also covers the rest of the startup.
    serving.init_app(app)
    db.init_app(app)
    passwords.init_app(app)
    email.init_app(app)
    if app.config["DEV_MAILBOX"]:
        # Before the outbox, so the mailbox listens when the outbox opens.
        init_dev_mailbox(app)
        app.register_blueprint(dev_bp)
    outbox.init_app(app)
    _init_auth(app)
    api.init_app(app)
    app.register_blueprint(main_bp)
    app.register_blueprint(auth_bp)
    app.register_blueprint(api.bp)
    app.register_blueprint(api.docs_bp)
    app.register_blueprint(admin_bp)

    init_cli(app)
    db.dispose_last(app)
    _register_error_handlers(app)
    _register_security_headers(app)

    @app.context_processor
    async def _inject_account() -> dict[str, Any]:
        return {"account": g.get("account")}

    return app


def _configure(app: Quart, settings: Settings, instance_path: Path) -> None:
    config = app.config
    for name, value in settings.model_dump().items():
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        config[name] = value

    production = settings.APP_ENV == "production"
    config["SECRET_KEY"] = resolve_secret_key(settings, instance_path)
    # Stored as account addresses are, so `User.role` can compare the two.
    if settings.APP_ADMIN is not None:
        config["APP_ADMIN"] = normalize_email(settings.APP_ADMIN)
    config["DATABASE_URL"] = resolve_database_url(settings, instance_path)
    config["MAIL_PORT"] = settings.mail_port
    config["APP_BASE_URL"] = settings.APP_BASE_URL or DEVELOPMENT_BASE_URL
    config["MAIL_DEFAULT_SENDER"] = settings.MAIL_DEFAULT_SENDER or _default_sender(
        config["APP_BASE_URL"]
    )
    config["DEV_MAILBOX"] = (
        settings.APP_ENV == "development" and not settings.MAIL_SERVER
    )
    config["TESTING"] = settings.APP_ENV == "testing"

    # The session and login cookies are HttpOnly and SameSite everywhere, and
    # Secure in production only, so plain http on 127.0.0.1 works in development.
    config["SESSION_COOKIE_SECURE"] = production
    config["SESSION_COOKIE_HTTPONLY"] = True
    config["SESSION_COOKIE_SAMESITE"] = "Lax"
    config["QUART_AUTH_COOKIE_SECURE"] = production
    config["QUART_AUTH_COOKIE_HTTP_ONLY"] = True
    config["QUART_AUTH_COOKIE_SAMESITE"] = "Lax"
    config["QUART_AUTH_SALT"] = "quart-app/login"
    config["MAX_CONTENT_LENGTH"] = 1024 * 1024


def _init_auth(app: Quart) -> None:
    auth = QuartAuth(app)
    # Quart-Auth adds a synchronous context processor for `current_user`, and
    # Quart runs synchronous functions in a thread pool, so every render would
    # hop to a thread. The templates use `account` instead, so it is removed.
    processors = app.template_context_processors[None]
    app.template_context_processors[None] = [
        processor
        for processor in processors
        if getattr(processor, "__self__", None) is not auth
    ]


def _default_sender(base_url: str) -> str:
    host = urlsplit(base_url).hostname or "localhost"
    # An address at an IP needs the bracketed literal form, which many relays
    # reject, so a host given as an IP address is replaced by "localhost".
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return f"Quart App <noreply@{host}>"
    return "Quart App <noreply@localhost>"


def _register_error_handlers(app: Quart) -> None:
    @app.errorhandler(Unauthorized)
    async def _login_first(_error: Unauthorized) -> ResponseReturnValue:
        return redirect(url_for("auth.login", next=request.full_path.rstrip("?")))

    @app.errorhandler(HTTPException)
    async def _http_error(error: HTTPException) -> ResponseReturnValue:
        # Under /api every error is JSON, also for a path or method no route has.
        if api.is_api_request():
            return api.error_response(error)
        page = await render_template("error.html", error=error)
        return page, error.code or 500

    @app.errorhandler(Exception)
    async def _server_error(error: Exception) -> ResponseReturnValue:
        # The route's rule, not the path, so a token in a link stays out of the log.
        rule = request.url_rule.rule if request.url_rule is not None else "?"
        app.logger.exception(
            "Unhandled error on %s %s", request.method, rule, exc_info=error
        )
        if api.is_api_request():
            return api.server_error_response()
        page = await render_template("error.html", error=None)
        return page, 500


def _register_security_headers(app: Quart) -> None:
    @app.after_request
    async def _add_headers(response: Any) -> Any:
        headers = response.headers
        location = headers.get("Location")
        if location:
            headers["Location"] = _relative_to_this_host(location)
        headers.setdefault("X-Content-Type-Options", "nosniff")
        # Confirmation links carry a token in the path: never send it onwards.
        headers.setdefault("Referrer-Policy", "no-referrer")
        headers.setdefault("X-Frame-Options", "DENY")
        headers.setdefault(
            "Content-Security-Policy",
            "default-src 'self'; img-src 'self' data:; style-src 'self' "
            "'unsafe-inline'; frame-ancestors 'none'; form-action 'self'",
        )
        return response


def _relative_to_this_host(location: str) -> str:
    # Routing redirects, such as the one that merges "//" in a path, are built
    # with the request's Host header, which a client can forge. A redirect to
    # this host needs no host at all.
    parts = urlsplit(location)
    if not parts.netloc or parts.netloc != request.host:
        return location
    return urlunsplit(("", "", parts.path or "/", parts.query, parts.fragment))
