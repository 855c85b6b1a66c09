"""Database models."""

import hashlib
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from email_validator import EmailNotValidError, validate_email
from quart import current_app
from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    func,
    select,
)
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

from quart_app.db import Base

EMAIL_MAX_LENGTH = 254
USERNAME_MAX_LENGTH = 64
# The largest value the integer id columns hold on PostgreSQL.
MAX_ID = 2**31 - 1


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware datetime column that reads back aware on every database.

    SQLite keeps no zone, so its values come back naive; they were written in
    UTC, and this type marks them so.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        if value is not None:
            if value.tzinfo is None:
                raise ValueError(f"naive datetime {value!r}: pass one with a zone")
            value = value.astimezone(UTC)
        return value

    def process_result_value(self, value: Any, dialect: Dialect) -> Any:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value


def normalize_email(email: str) -> str:
    """Return the form in which an address is stored and compared.

    The domain is converted to its ASCII (IDNA) form and the whole address is
    lower-cased, so "carol@Bücher.example" and "carol@xn--bcher-kva.example" are
    one account. Mail servers treat the domain without regard to case, and
    almost all treat the local part that way too. Text that is not a valid
    address is only stripped and lower-cased, which is enough to look it up.
    """
    try:
        valid = validate_email(
            email.strip(), check_deliverability=False, allow_smtputf8=False
        )
    except EmailNotValidError:
        return email.strip().lower()
    return (valid.ascii_email or valid.normalized).lower()


class Role(StrEnum):
    USER = "User"
    ADMINISTRATOR = "Administrator"


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    email: Mapped[str] = mapped_column(
        String(EMAIL_MAX_LENGTH), unique=True, index=True
    )
    username: Mapped[str] = mapped_column(String(USERNAME_MAX_LENGTH), unique=True)
    # The lower-cased username, so "Alice" and "alice" cannot both register.
    username_key: Mapped[str] = mapped_column(String(USERNAME_MAX_LENGTH), unique=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    confirmed: Mapped[bool] = mapped_column(Boolean, default=False)
    member_since: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_seen: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # When the last confirmation email was queued, to limit how often a user
    # can ask for another one.
    confirmation_sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # When the last password reset email was queued. Anyone can request one, so
    # this limits how often a stranger can have the app mail the account.
    password_reset_sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # When the last email to confirm a new address was queued, to limit how
    # often the account can have the app mail an address of its choice.
    email_change_sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Failed logins since the last successful one, and when the last failed, so
    # that guessing the password is stopped after LOGIN_MAX_FAILURES attempts.
    failed_logins: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    last_failed_login_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    @property
    def role(self) -> Role:
        """Administrator for the APP_ADMIN address, User for every other one.

        The role follows the current address and setting, so an account that
        moves away from the APP_ADMIN address loses it at once, and a change of
        APP_ADMIN gives it to the account that has the new address.
        """
        admin: str | None = current_app.config["APP_ADMIN"]
        return Role.ADMINISTRATOR if self.email == admin else Role.USER

    @property
    def is_administrator(self) -> bool:
        """Whether the user has the Administrator role and a confirmed address.

        Anyone can sign up with the APP_ADMIN address, so the role counts only
        once its confirmation link, sent to that address, has been opened.
        """
        return self.confirmed and self.role is Role.ADMINISTRATOR

    @property
    def auth_id(self) -> str:
        """The value kept in the login cookie.

        It carries a fingerprint of the password hash, so changing the password
        ends every other login of the account.
        """
        return f"{self.id}:{self.password_fingerprint}"

    @property
    def password_fingerprint(self) -> str:
        """A short digest of the password hash.

        argon2 salts every hash afresh, so the digest changes with each new
        password, even when the password itself is the same.
        """
        return hashlib.sha256(self.password_hash.encode()).hexdigest()[:16]

    def __repr__(self) -> str:
        return f"<User {self.id} {self.username!r}>"


class OutboxStatus(StrEnum):
    PENDING = "pending"
    SENDING = "sending"
    SENT = "sent"
    FAILED = "failed"


class OutboxMessage(Base):
    """An email waiting for delivery, or the record of a delivered one.

    A row is written in the same transaction as the change that caused the email,
    so a committed signup always has its email and a rolled-back one has none.
    """

    __tablename__ = "outbox"
    __table_args__ = (
        Index("ix_outbox_status_next_attempt_at", "status", "next_attempt_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int | None] = mapped_column(
        ForeignKey("users.id", ondelete="SET NULL")
    )
    sender: Mapped[str] = mapped_column(String(EMAIL_MAX_LENGTH))
    recipients: Mapped[list[str]] = mapped_column(JSON)
    subject: Mapped[str] = mapped_column(String(998))
    # The whole RFC 5322 message as it goes on the wire, so a retry sends exactly
    # the bytes that were rendered in the request.
    message: Mapped[bytes] = mapped_column(LargeBinary)
    status: Mapped[str] = mapped_column(String(16), default=OutboxStatus.PENDING.value)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # The reply or error of the last failed attempt. A row sent on a later
    # attempt keeps it, as the record of why it took more than one.
    last_error: Mapped[str | None] = mapped_column(Text)
    # Recipients the relay refused while it accepted the others: address -> reply.
    refused_recipients: Mapped[dict[str, str] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # A worker that claims the row sets a fresh token and an expiry. Another
    # worker may take the row over only once the lease has expired.
    lease_owner: Mapped[str | None] = mapped_column(String(64))
    lease_token: Mapped[str | None] = mapped_column(String(32))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    def __repr__(self) -> str:
        return f"<OutboxMessage {self.id} {self.status}>"


async def create_user(
    *,
    session: AsyncSession,
    email: str,
    username: str,
    password_hash: str,
) -> User:
    """Add a user to `session` and flush it so it has an id; the caller commits."""
    email = normalize_email(email)
    now = utcnow()
    user = User(
        email=email,
        username=username,
        username_key=username.lower(),
        password_hash=password_hash,
        confirmed=False,
        member_since=now,
        last_seen=now,
        confirmation_sent_at=now,
        failed_logins=0,
    )
    session.add(user)
    await session.flush()
    return user


async def find_user_by_email(*, session: AsyncSession, email: str) -> User | None:
    result = await session.execute(
        select(User).where(User.email == normalize_email(email))
    )
    return result.scalar_one_or_none()


async def find_user_by_auth_id(*, session: AsyncSession, auth_id: str) -> User | None:
    """Return the user that a login cookie names, or None if it no longer matches."""
    user_id, _, _ = auth_id.partition(":")
    # Ids are 32-bit integers in the database, and PostgreSQL rejects a larger
    # value with an error instead of finding no row.
    if not (user_id.isascii() and user_id.isdecimal()) or int(user_id) > MAX_ID:
        return None
    user = await session.get(User, int(user_id))
    if user is None or user.auth_id != auth_id:
        return None
    return user


async def email_taken(*, session: AsyncSession, email: str) -> bool:
    return await find_user_by_email(session=session, email=email) is not None


async def username_taken(*, session: AsyncSession, username: str) -> bool:
    result = await session.execute(
        select(func.count())
        .select_from(User)
        .where(User.username_key == username.lower())
    )
    return result.scalar_one() > 0
