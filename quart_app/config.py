"""Settings read from the environment, typed and checked once at start-up.

The names are the Flask-Mail ones, so an app moving from Flask keeps its environment.
`load_settings` raises `ConfigError` with one line per invalid variable, naming the
variable and the fix.
"""

import ipaddress
import re
import secrets
from email.utils import parseaddr
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from email_validator import EmailNotValidError, validate_email
from pydantic import (
    BeforeValidator,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from quart_app.errors import ConfigError

_ASYNC_DRIVERS = {"sqlite": "aiosqlite", "postgresql": "asyncpg"}
_TRUE = frozenset({"true", "1", "yes", "on"})
# Upper bounds in seconds. Larger values are almost surely typing mistakes, and some
# would overflow the date arithmetic of the outbox at run time.
_HOUR = 3600
_DAY = 24 * _HOUR
_HOST_LABEL = re.compile(r"\A(?!-)[A-Za-z0-9-]{1,63}(?<!-)\Z")
_NUMERIC_LABEL = re.compile(r"\A(?:[0-9]+|0[xX][0-9A-Fa-f]*)\Z")
_FALSE = frozenset({"false", "0", "no", "off"})


def _parse_bool(value: Any) -> Any:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
    raise ValueError("use one of true/false, 1/0, yes/no, on/off")


StrictBool = Annotated[bool, BeforeValidator(_parse_bool)]


def _empty_as_none(value: Any) -> Any:
    if isinstance(value, str) and not value.strip():
        return None
    return value


class Settings(BaseSettings):
    """The app's settings, from keyword arguments first and the environment second."""

    # An empty variable counts as unset, as with `MAIL_USE_TLS=` in a compose file.
    model_config = SettingsConfigDict(
        case_sensitive=True, extra="ignore", env_ignore_empty=True
    )

    APP_ENV: Literal["development", "production", "testing"] = "development"
    SECRET_KEY: Annotated[SecretStr | None, BeforeValidator(_empty_as_none)] = None
    DATABASE_URL: Annotated[str | None, BeforeValidator(_empty_as_none)] = None
    INSTANCE_PATH: Annotated[Path | None, BeforeValidator(_empty_as_none)] = None
    LOG_LEVEL: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    APP_BASE_URL: Annotated[str | None, BeforeValidator(_empty_as_none)] = None
    APP_ADMIN: Annotated[str | None, BeforeValidator(_empty_as_none)] = None
    TOKEN_MAX_AGE: int = Field(3600, gt=0, le=30 * _DAY)
    API_TOKEN_MAX_AGE: int = Field(3600, gt=0, le=30 * _DAY)
    CONFIRMATION_RESEND_INTERVAL: int = Field(60, ge=0, le=_DAY)
    PASSWORD_RESET_INTERVAL: int = Field(60, ge=0, le=_DAY)
    EMAIL_CHANGE_INTERVAL: int = Field(60, ge=0, le=_DAY)
    LOGIN_MAX_FAILURES: int = Field(10, ge=1, le=1000)
    LOGIN_LOCKOUT: int = Field(15 * 60, gt=0, le=_DAY)

    MAIL_SERVER: Annotated[str | None, BeforeValidator(_empty_as_none)] = None
    MAIL_PORT: Annotated[int | None, BeforeValidator(_empty_as_none)] = Field(
        None, ge=1, le=65535
    )
    MAIL_USE_TLS: StrictBool = False
    MAIL_USE_SSL: StrictBool = False
    MAIL_USERNAME: Annotated[str | None, BeforeValidator(_empty_as_none)] = None
    MAIL_PASSWORD: Annotated[SecretStr | None, BeforeValidator(_empty_as_none)] = None
    MAIL_DEFAULT_SENDER: Annotated[str | None, BeforeValidator(_empty_as_none)] = None
    MAIL_SUBJECT_PREFIX: str = "[Quart App]"
    MAIL_TIMEOUT: float = Field(10.0, gt=0, le=_HOUR, allow_inf_nan=False)
    MAIL_LOCAL_HOSTNAME: Annotated[str | None, BeforeValidator(_empty_as_none)] = None
    MAIL_CA_FILE: Annotated[Path | None, BeforeValidator(_empty_as_none)] = None

    MAIL_MAX_CONNECTIONS: int = Field(4, ge=1, le=100)
    MAIL_MAX_MESSAGES_PER_CONNECTION: int = Field(100, ge=1, le=100_000)
    # With the default delays, MAIL_MAX_AGE ends the retries first, after about
    # 70 attempts.
    MAIL_MAX_ATTEMPTS: int = Field(100, ge=1, le=1000)
    MAIL_MAX_AGE: float = Field(2 * _DAY, gt=0, le=30 * _DAY, allow_inf_nan=False)
    MAIL_RETRY_DELAY: float = Field(30.0, gt=0, le=_DAY, allow_inf_nan=False)
    MAIL_RETRY_MAX_DELAY: float = Field(_HOUR, gt=0, le=_DAY, allow_inf_nan=False)

    OUTBOX_WORKER: StrictBool = True
    OUTBOX_POLL_INTERVAL: float = Field(5.0, gt=0, le=_HOUR, allow_inf_nan=False)
    OUTBOX_LEASE: float = Field(120.0, gt=0, le=_DAY, allow_inf_nan=False)

    BACKGROUND_TASK_SHUTDOWN_TIMEOUT: float = Field(
        5.0, gt=0, le=_HOUR, allow_inf_nan=False
    )

    @field_validator("APP_BASE_URL")
    @classmethod
    def _check_base_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(
                "use scheme://host[:port], for example https://example.com"
            )
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ValueError(
                "remove the path, query and fragment: scheme://host[:port]"
            )
        if parts.username or parts.password:
            raise ValueError("remove the user name and password from the URL")
        if not _valid_host(parts.hostname):
            raise ValueError(
                "the host must be a domain name of letters, digits, hyphens and "
                "dots (the ASCII xn-- form for a non-ASCII name) or an IP address"
            )
        try:
            _ = parts.port  # urlsplit checks the port only when it is read
        except ValueError:
            raise ValueError("the port must be a number from 1 to 65535") from None
        return f"{parts.scheme}://{parts.netloc}"

    @field_validator("DATABASE_URL")
    @classmethod
    def _check_database_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            url = make_url(value)
        except ArgumentError:
            raise ValueError(
                "not a database URL: use sqlite+aiosqlite:///PATH or "
                "postgresql+asyncpg://USER:PASSWORD@HOST/DATABASE"
            ) from None
        backend = url.get_backend_name()
        driver = _ASYNC_DRIVERS.get(backend)
        if driver is None:
            raise ValueError("use a SQLite or PostgreSQL URL")
        if url.get_driver_name() != driver:
            raise ValueError(f"use the async driver: {backend}+{driver}://...")
        return value

    @field_validator("MAIL_CA_FILE")
    @classmethod
    def _check_ca_file(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(
                "no such file: give the path of a PEM file of CA certificates"
            )
        return value

    @field_validator("APP_ADMIN")
    @classmethod
    def _check_admin(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.strip()
        _check_address(value, example="admin@example.com")
        return value

    @field_validator("MAIL_DEFAULT_SENDER")
    @classmethod
    def _check_sender(cls, value: str | None) -> str | None:
        if value is not None:
            _check_address(parseaddr(value)[1], example="Acme <noreply@example.com>")
        return value

    @field_validator(
        "MAIL_SERVER",
        "MAIL_DEFAULT_SENDER",
        "MAIL_SUBJECT_PREFIX",
        "MAIL_LOCAL_HOSTNAME",
    )
    @classmethod
    def _check_single_line(cls, value: str | None) -> str | None:
        if value is not None and any(char in value for char in "\r\n\0"):
            raise ValueError("remove the line break or NUL character")
        return value

    @model_validator(mode="after")
    def _check_combinations(self) -> "Settings":
        if self.MAIL_USE_TLS and self.MAIL_USE_SSL:
            raise ValueError(
                "MAIL_USE_TLS (STARTTLS, port 587) and MAIL_USE_SSL (implicit TLS, "
                "port 465) are both set: set only one of them"
            )
        if self.MAIL_RETRY_MAX_DELAY < self.MAIL_RETRY_DELAY:
            raise ValueError(
                "MAIL_RETRY_MAX_DELAY is less than MAIL_RETRY_DELAY: raise it or "
                "lower MAIL_RETRY_DELAY"
            )
        if self.OUTBOX_LEASE < 4 * self.MAIL_TIMEOUT:
            raise ValueError(
                f"OUTBOX_LEASE ({self.OUTBOX_LEASE:g} s) is less than 4 times "
                f"MAIL_TIMEOUT ({self.MAIL_TIMEOUT:g} s): a send must end within "
                "half the lease and may need several SMTP steps, so raise "
                "OUTBOX_LEASE or lower MAIL_TIMEOUT"
            )
        if (self.MAIL_USERNAME is None) != (self.MAIL_PASSWORD is None):
            raise ValueError("set both MAIL_USERNAME and MAIL_PASSWORD, or neither")
        if self.APP_ENV == "production":
            missing = [
                name
                for name in ("SECRET_KEY", "APP_BASE_URL", "MAIL_SERVER")
                if getattr(self, name) is None
            ]
            if missing:
                raise ValueError(
                    f"{', '.join(missing)} must be set when APP_ENV=production"
                )
            secret = self.SECRET_KEY
            if secret is not None and len(secret.get_secret_value()) < 16:
                raise ValueError(
                    "SECRET_KEY is too short for production: use at least 32 random "
                    "characters"
                )
        return self

    @property
    def mail_port(self) -> int:
        """The SMTP port, defaulting to the usual one for the chosen TLS mode."""
        if self.MAIL_PORT is not None:
            return self.MAIL_PORT
        if self.MAIL_USE_SSL:
            return 465
        if self.MAIL_USE_TLS:
            return 587
        return 25


def load_settings(overrides: dict[str, Any] | None = None) -> Settings:
    """Build the settings from `overrides` and the environment.

    Keys in `overrides` win over environment variables of the same name.

    Raises:
        ConfigError: one line per invalid variable, naming it and the fix.
    """
    try:
        return Settings(**(overrides or {}))
    except ValidationError as error:
        raise ConfigError(_describe(error)) from None


def resolve_secret_key(settings: Settings, instance_path: Path) -> str:
    """Return SECRET_KEY, or else a generated key.

    In development the generated key is kept in the instance folder, so sessions
    survive a restart and every worker on the machine shares it. In testing each
    app gets a fresh one. Production requires SECRET_KEY.
    """
    if settings.SECRET_KEY is not None:
        return settings.SECRET_KEY.get_secret_value()
    if settings.APP_ENV == "testing":
        return secrets.token_urlsafe(32)

    key_file = instance_path / "secret_key"
    try:
        return key_file.read_text().strip()
    except FileNotFoundError:
        pass
    instance_path.mkdir(parents=True, exist_ok=True)
    key = secrets.token_urlsafe(32)
    try:
        with key_file.open("x") as handle:
            handle.write(key)
    except FileExistsError:
        # Another worker wrote the file first, so every worker uses its key.
        return key_file.read_text().strip()
    key_file.chmod(0o600)
    return key


def resolve_database_url(settings: Settings, instance_path: Path) -> str:
    """Return DATABASE_URL, or a SQLite file in the instance folder by default."""
    if settings.DATABASE_URL is not None:
        return settings.DATABASE_URL
    instance_path.mkdir(parents=True, exist_ok=True)
    return f"sqlite+aiosqlite:///{instance_path / 'app.db'}"


def _valid_host(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        labels = host.removesuffix(".").split(".")
        # A name that ends in a number, such as "127.1" or "0x7f.1", is not a
        # domain name: URL parsers in browsers read it as a short IPv4 address.
        if _NUMERIC_LABEL.match(labels[-1]):
            return False
        return len(host) <= 253 and all(_HOST_LABEL.match(label) for label in labels)
    return True


def _check_address(address: str, *, example: str) -> None:
    # ASCII only, because a non-ASCII local part needs SMTPUTF8 from the relay.
    try:
        validate_email(address, check_deliverability=False, allow_smtputf8=False)
    except EmailNotValidError as error:
        raise ValueError(f"use an address such as {example!r}: {error}") from None


def _describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        message = item["msg"].removeprefix("Value error, ").rstrip(".")
        if not item["loc"]:
            lines.append(f"Invalid settings: {message}.")
            continue
        name = item["loc"][0]
        value = item.get("input")
        shown = "***" if "PASSWORD" in str(name) or name == "SECRET_KEY" else value
        lines.append(f"Invalid setting {name}={shown!r}: {message}.")
    return "\n".join(lines)
