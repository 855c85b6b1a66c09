"""Pydantic models of the API's request bodies, query strings and responses.

Request models reject unknown fields, so a misspelt field name is an error
rather than a value silently ignored. The signup rules match the HTML form's:
an address that can be sent to without SMTPUTF8, a username that starts with a
letter, and a password of PASSWORD_MIN_LENGTH to PASSWORD_MAX_LENGTH characters.
"""

import re
from collections.abc import Mapping
from datetime import datetime
from typing import Annotated, Literal, Self

from email_validator import EmailNotValidError, validate_email
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    RootModel,
)
from quart.typing import ResponseReturnValue

from quart_app.accounts import PASSWORD_MAX_LENGTH, PASSWORD_MIN_LENGTH
from quart_app.models import (
    EMAIL_MAX_LENGTH,
    MAX_ID,
    USERNAME_MAX_LENGTH,
    OutboxMessage,
    OutboxStatus,
    User,
)

USERNAME_PATTERN = r"[A-Za-z][A-Za-z0-9_.]*"
OUTBOX_PAGE_SIZE = 50
OUTBOX_MAX_PAGE_SIZE = 200

# The return type of API views. Quart-Schema 0.25 types a model in a response as
# type[Model], a class, so a view that returns a model instance needs this.
ApiResponse = (
    ResponseReturnValue
    | BaseModel
    | tuple[BaseModel, int]
    | tuple[BaseModel, int, Mapping[str, str]]
)


def _strip(value: object) -> object:
    return value.strip() if isinstance(value, str) else value


def _check_address(value: str) -> str:
    if any(ord(char) < 32 or ord(char) == 127 for char in value):
        raise ValueError("remove the line breaks and control characters")
    try:
        validate_email(value, check_deliverability=False, allow_smtputf8=False)
    except EmailNotValidError as error:
        raise ValueError(f"enter a valid email address. {error}") from None
    return value


def _check_username(value: str) -> str:
    if re.fullmatch(USERNAME_PATTERN, value) is None:
        raise ValueError(
            "usernames start with a letter and contain only letters, digits, "
            "dots and underscores"
        )
    return value


EmailAddress = Annotated[
    str,
    BeforeValidator(_strip),
    Field(
        min_length=1, max_length=EMAIL_MAX_LENGTH, json_schema_extra={"format": "email"}
    ),
    AfterValidator(_check_address),
]
Password = Annotated[
    str, Field(min_length=PASSWORD_MIN_LENGTH, max_length=PASSWORD_MAX_LENGTH)
]
# Tokens from emails are about 100 characters, so 1,000 leaves room to spare.
LinkToken = Annotated[str, Field(min_length=1, max_length=1000)]


class RequestModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SignupRequest(RequestModel):
    """A new account: a confirmation email goes to `email`."""

    email: EmailAddress
    username: Annotated[
        str,
        Field(
            min_length=1,
            max_length=USERNAME_MAX_LENGTH,
            json_schema_extra={"pattern": f"^{USERNAME_PATTERN}$"},
        ),
        AfterValidator(_check_username),
    ]
    password: Password


class ConfirmationRequest(RequestModel):
    """The token from a confirmation email's link."""

    token: LinkToken


class PasswordResetRequest(RequestModel):
    """The address to send a password reset email to."""

    email: EmailAddress


class NewPasswordRequest(RequestModel):
    """The new password of an account, set with a reset token."""

    password: Password


class OutboxQuery(RequestModel):
    """Filters and paging of the outbox list, newest message first."""

    status: OutboxStatus | None = None
    limit: int = Field(OUTBOX_PAGE_SIZE, ge=1, le=OUTBOX_MAX_PAGE_SIZE)
    # Paging cursor: only messages with a smaller id, as given in the Link header.
    before: int | None = Field(None, ge=1, le=MAX_ID)


class UserResponse(BaseModel):
    """An account."""

    id: int
    email: str
    username: str
    confirmed: bool

    @classmethod
    def from_user(cls, user: User) -> Self:
        return cls(
            id=user.id,
            email=user.email,
            username=user.username,
            confirmed=user.confirmed,
        )


class TokenResponse(BaseModel):
    """A bearer token and the time it expires (UTC)."""

    token: str
    expires_at: datetime


class OutboxMessageResponse(BaseModel):
    """An email in the outbox; `to` lists its recipients as in a To header."""

    id: int
    to: str
    subject: str
    status: OutboxStatus
    attempts: int
    last_error: str | None = Field(
        description="The reply or error of the last failed attempt. A message "
        "sent on a later attempt keeps it."
    )
    next_attempt_at: datetime

    @classmethod
    def from_row(cls, row: OutboxMessage) -> Self:
        return cls(
            id=row.id,
            to=", ".join(row.recipients),
            subject=row.subject,
            status=OutboxStatus(row.status),
            attempts=row.attempts,
            last_error=row.last_error,
            next_attempt_at=row.next_attempt_at,
        )


class OutboxPage(RootModel[list[OutboxMessageResponse]]):
    """Outbox messages, newest first."""


class OutboxStats(BaseModel):
    """Outbox counts: pending includes messages being sent, stuck those whose
    worker stopped mid-send."""

    pending: int
    failed: int
    stuck: int
    oldest_pending_age_seconds: float | None


class HealthResponse(BaseModel):
    """The service health: whether the database responds, with the outbox counts.

    `outbox` is "unavailable" when the database responds but the outbox table
    cannot be read, usually because the schema has not been migrated, and is
    missing when the database does not respond.
    """

    status: Literal["ok", "error"]
    database: Literal["ok", "unavailable"]
    outbox: OutboxStats | Literal["unavailable"] | None = None


class AcceptedResponse(BaseModel):
    """A note that the request was accepted, saying what happens next."""

    detail: str


class ErrorResponse(BaseModel):
    """An error: a short code for programs and a sentence for people."""

    error: str
    detail: str
