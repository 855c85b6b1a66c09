"""Account operations shared by the HTML views and the JSON API.

Each function takes the request's database session as `session` and leaves the
commit to the caller, so any email it queues in the outbox commits with the change
that caused it, or vanishes with it on a rollback. They need an app context, for
the settings, the password hasher and the email templates. They do not validate
input formats: the caller checks addresses and password lengths first, against
the same rules as the forms (for passwords, `PASSWORD_MIN_LENGTH` and
`PASSWORD_MAX_LENGTH`).
"""

from datetime import datetime, timedelta
from typing import Any, cast

from quart import current_app
from sqlalchemy import or_, update
from sqlalchemy.engine import CursorResult
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import InstrumentedAttribute

from quart_app.auth.mail import send_confirmation, send_new_user_notice
from quart_app.auth.tokens import Purpose, load_token
from quart_app.errors import DuplicateUser, TokenInvalid
from quart_app.models import (
    User,
    create_user,
    email_taken,
    find_user_by_email,
    normalize_email,
    username_taken,
    utcnow,
)
from quart_app.passwords import hash_password, needs_rehash, verify_password

__all__ = (
    "PASSWORD_MAX_LENGTH",
    "PASSWORD_MIN_LENGTH",
    "authenticate",
    "confirm_account",
    "register_user",
    "resend_confirmation",
)

PASSWORD_MIN_LENGTH = 8
# argon2 accepts any length, but hashing megabytes per request would be a cheap way
# to tie up the server.
PASSWORD_MAX_LENGTH = 128


async def register_user(
    *, session: AsyncSession, email: str, username: str, password: str
) -> User:
    """Create an unconfirmed user and queue its confirmation email.

    The address is stored normalised (see `normalize_email`) and the username is
    compared without regard to case. The APP_ADMIN address gets the
    Administrator role. A "New User" notice to APP_ADMIN, if set, is queued too.

    Raises:
        DuplicateUser: the address (``field == "email"``) or the username
            (``field == "username"``) is registered already. When another
            request registered it between the check and the insert, the unique
            constraint rejects the insert, and the session has been rolled back
            before this is raised.
    """
    email = normalize_email(email)
    duplicate = await _duplicate_field(session=session, email=email, username=username)
    if duplicate is not None:
        raise DuplicateUser(duplicate)

    password_hash = await hash_password(password)
    try:
        user = await create_user(
            session=session,
            email=email,
            username=username,
            password_hash=password_hash,
            admin_email=current_app.config["APP_ADMIN"],
        )
    except IntegrityError:
        await session.rollback()
        duplicate = await _duplicate_field(
            session=session, email=email, username=username
        )
        if duplicate is None:
            raise
        raise DuplicateUser(duplicate) from None

    await send_confirmation(user)
    await send_new_user_notice(user)
    return user


async def authenticate(
    *, session: AsyncSession, email: str, password: str
) -> User | None:
    """Return the user with this address and password, or None.

    An unknown address still costs one password check, against a dummy hash, so
    the response time does not reveal which addresses are registered. A hash made
    with older argon2 parameters is replaced by a new one in `session`, which
    changes `User.auth_id` and so ends the user's other logins.
    """
    user = await find_user_by_email(session=session, email=email)
    matched = await verify_password(user.password_hash if user else None, password)
    if user is None or not matched:
        return None

    if needs_rehash(user.password_hash):
        user.password_hash = await hash_password(password)
    return user


async def confirm_account(*, session: AsyncSession, token: str) -> tuple[User, bool]:
    """Confirm the account that a link from a confirmation email names.

    Returns the user and whether it was confirmed already, in which case nothing
    changes.

    Raises:
        TokenExpired: the link is older than TOKEN_MAX_AGE.
        TokenInvalid: the link is malformed, tampered with, made for another
            purpose, or names a user that no longer has the address it was sent to.
    """
    payload = load_token(Purpose.CONFIRM, token)
    user = await session.get(User, _user_id(payload, "confirm"))
    # The address is part of the token, so a link sent to an old address
    # cannot confirm an account whose address has changed since.
    if user is None or user.email != payload.get("email"):
        raise TokenInvalid("The confirmation link does not match any account.")

    already_confirmed = user.confirmed
    if not already_confirmed:
        user.confirmed = True
    return user, already_confirmed


async def resend_confirmation(*, session: AsyncSession, user: User) -> bool:
    """Queue a new confirmation email unless one was queued too recently.

    Returns False, queueing nothing, when the last one is less than
    CONFIRMATION_RESEND_INTERVAL seconds old. Of several requests running at once,
    only one returns True. An account confirmed already still gets the email, so
    callers that want otherwise check `User.confirmed` first.
    """
    claimed = await _claim_email_slot(
        session=session,
        user=user,
        sent_at=User.confirmation_sent_at,
        interval=current_app.config["CONFIRMATION_RESEND_INTERVAL"],
    )
    if claimed:
        await send_confirmation(user)
    return claimed


async def _duplicate_field(
    *, session: AsyncSession, email: str, username: str
) -> str | None:
    if await email_taken(session=session, email=email):
        return "email"
    if await username_taken(session=session, username=username):
        return "username"
    return None


async def _claim_email_slot(
    *,
    session: AsyncSession,
    user: User,
    sent_at: InstrumentedAttribute[datetime | None],
    interval: int,
) -> bool:
    now = utcnow()
    # One conditional UPDATE both checks and moves the time of the last email.
    # Concurrent requests wait for the first one's lock, and once it commits the
    # row no longer matches for them, so only one of them sends.
    result = await session.execute(
        update(User)
        .where(
            User.id == user.id,
            or_(sent_at.is_(None), sent_at <= now - timedelta(seconds=interval)),
        )
        .values({sent_at.key: now})
        .execution_options(synchronize_session=False)
    )
    return cast(CursorResult[Any], result).rowcount == 1


def _user_id(payload: dict[str, Any], key: str) -> int:
    user_id = payload.get(key)
    # Ids are 32-bit integers in the database, and PostgreSQL rejects a larger
    # value with an error instead of finding no row.
    if type(user_id) is not int or not 0 < user_id < 2**31:
        raise TokenInvalid("The link does not name a valid account.")
    return user_id
