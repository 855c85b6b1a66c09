"""Account operations shared by the HTML views and the JSON API.

Each function takes the request's database session as `session` and leaves the
commit to the caller, so any email it queues in the outbox commits with the change
that caused it, or vanishes with it on a rollback. They need an app context, for
the settings, the password hasher and the email templates. They do not validate
input formats: the caller checks addresses and password lengths first, against
the same rules as the forms (for passwords, `PASSWORD_MIN_LENGTH` and
`PASSWORD_MAX_LENGTH`).

Before each password hash, a function ends the session's transaction if it has
written nothing yet (`release_connection`), so a request waiting for a hashing
thread keeps no pooled database connection.
"""

import asyncio
import hashlib
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, cast

from quart import current_app
from sqlalchemy import and_, case, or_, select, update
from sqlalchemy.engine import CursorResult
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import InstrumentedAttribute

from quart_app.account_emails import (
    send_confirmation,
    send_email_change,
    send_email_changed_notice,
    send_new_user_notice,
    send_password_changed_notice,
    send_password_reset,
)
from quart_app.db import release_connection, session_scope
from quart_app.errors import (
    DuplicateUser,
    IncorrectPassword,
    LoginThrottled,
    TokenInvalid,
)
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
from quart_app.tokens import Purpose, generate_token, load_token

__all__ = (
    "PASSWORD_MAX_LENGTH",
    "PASSWORD_MIN_LENGTH",
    "authenticate",
    "change_email",
    "change_password",
    "confirm_account",
    "register_user",
    "request_email_change",
    "request_password_reset",
    "resend_confirmation",
    "reset_password",
    "verify_reset_token",
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
            constraint rejects the insert. The session has then been rolled back,
            and the objects in it reloaded, before this is raised.
    """
    email = normalize_email(email)
    duplicate = await _duplicate_field(session=session, email=email, username=username)
    if duplicate is not None:
        raise DuplicateUser(duplicate)

    await release_connection(session)
    password_hash = await hash_password(password)
    try:
        user = await create_user(
            session=session,
            email=email,
            username=username,
            password_hash=password_hash,
        )
    except IntegrityError:
        await _roll_back(session)
        duplicate = await _duplicate_field(
            session=session, email=email, username=username
        )
        if duplicate is None:
            raise
        raise DuplicateUser(duplicate) from None

    await send_confirmation(user, session=session)
    await send_new_user_notice(user, session=session)
    return user


async def authenticate(
    *, session: AsyncSession, email: str, password: str
) -> User | None:
    """Return the user with this address and password, or None.

    After LOGIN_MAX_FAILURES failed logins in a row, each less than LOGIN_LOCKOUT
    seconds after the one before, the account's password is not checked until
    LOGIN_LOCKOUT seconds after the last one. A successful login or a password
    reset starts the count again. Requests sent at the same time count too, so
    no more than LOGIN_MAX_FAILURES passwords are checked before a lockout.

    An unknown address still costs one password check, against a dummy hash, so
    the hash time does not reveal which addresses are registered. A hash made
    with older argon2 parameters is replaced by a new one in `session`, which
    changes `User.auth_id` and so ends the user's other logins.

    NOTE: a registered address also costs the database write that counts the
    attempt, and a locked account gets LoginThrottled, so a client that sends
    many requests can still tell registered addresses from others.

    Raises:
        LoginThrottled: the account is locked out for now, and `retry_after`
            gives the seconds left.
    """
    user = await find_user_by_email(session=session, email=email)
    await release_connection(session)
    if user is None:
        await verify_password(None, password)
        return None
    if not await _check_password(user, password):
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
        await send_confirmation(user, session=session)
    return claimed


async def request_password_reset(*, session: AsyncSession, email: str) -> None:
    """Queue a password reset email if an account has this address.

    Nothing happens for an unknown address, or when the account's last reset
    email is less than PASSWORD_RESET_INTERVAL seconds old, so that a stranger
    with the address cannot flood its mailbox. The caller responds the same in
    every case, so the response does not reveal whether the address is
    registered. The link in the email works once, and only while the account
    keeps its password and address.
    """
    user = await find_user_by_email(session=session, email=email)
    if user is None:
        return

    claimed = await _claim_email_slot(
        session=session,
        user=user,
        sent_at=User.password_reset_sent_at,
        interval=current_app.config["PASSWORD_RESET_INTERVAL"],
    )
    if claimed:
        token = generate_token(
            Purpose.RESET_PASSWORD,
            {
                "reset": user.id,
                "email": user.email,
                "password": user.password_fingerprint,
            },
        )
        await send_password_reset(user, token, session=session)


async def verify_reset_token(*, session: AsyncSession, token: str) -> User:
    """Return the user whose password a reset link may change, without changing it.

    Raises:
        TokenExpired: the link is older than TOKEN_MAX_AGE.
        TokenInvalid: the link is malformed, tampered with or made for another
            purpose, or the account's password or address changed after it was
            sent, which includes a reset through this same link.
    """
    payload = load_token(Purpose.RESET_PASSWORD, token)
    user = await session.get(User, _user_id(payload, "reset"))
    if (
        user is None
        or user.email != payload.get("email")
        or user.password_fingerprint != payload.get("password")
    ):
        raise TokenInvalid("The password reset link was used already or is outdated.")
    return user


async def reset_password(*, session: AsyncSession, token: str, password: str) -> User:
    """Set a new password through a link from a password reset email.

    The account is confirmed too, because the link proves control of its
    address. The new password changes `User.auth_id`, which ends every login of
    the account, and makes the link invalid. The account's address gets a
    notice of the change.

    Raises:
        TokenExpired: the link is older than TOKEN_MAX_AGE.
        TokenInvalid: see `verify_reset_token`. Of two requests that use one
            link at the same time, the one that commits second gets this.
    """
    user = await verify_reset_token(session=session, token=token)
    old_hash = user.password_hash
    await release_connection(session)
    new_hash = await hash_password(password)

    # The old hash in the WHERE clause makes the link single-use even when two
    # requests verified it at once, because the second UPDATE no longer matches.
    result = await session.execute(
        update(User)
        .where(User.id == user.id, User.password_hash == old_hash)
        .values(
            password_hash=new_hash,
            confirmed=True,
            failed_logins=0,
            last_failed_login_at=None,
        )
        .execution_options(synchronize_session=False)
    )
    if cast(CursorResult[Any], result).rowcount != 1:
        raise TokenInvalid("The password reset link was used already.")
    await session.refresh(user)
    await send_password_changed_notice(user, session=session)
    return user


async def change_password(
    *, session: AsyncSession, user: User, old_password: str, password: str
) -> bool:
    """Replace the password of `user` if `old_password` is its current one.

    Returns False, changing nothing, when `old_password` is wrong. The new
    password changes `User.auth_id`, so it ends the account's other logins. A
    caller that wants to keep the current login logs it in again with the new
    `auth_id` after the commit. The account's address gets a notice of the change.

    A wrong `old_password` counts as a failed login (see `authenticate`).

    Raises:
        LoginThrottled: the account is locked out for now.
    """
    await release_connection(session)
    if not await _check_password(user, old_password):
        return False

    user.password_hash = await hash_password(password)
    await send_password_changed_notice(user, session=session)
    return True


async def request_email_change(
    *, session: AsyncSession, user: User, new_email: str, password: str
) -> bool:
    """Queue an email to `new_email` with a link that makes it the user's address.

    The address stays as it is until the link is opened (see `change_email`).
    Returns False, queueing nothing, when the account's last such email is less
    than EMAIL_CHANGE_INTERVAL seconds old.

    Raises:
        IncorrectPassword: `password` is not the user's password. This counts
            as a failed login (see `authenticate`).
        LoginThrottled: the account is locked out for now.
        DuplicateUser: `new_email` is registered already, to this account or
            another one (``field == "email"``).
    """
    await release_connection(session)
    if not await _check_password(user, password):
        raise IncorrectPassword("The password is incorrect.")
    new_email = normalize_email(new_email)
    if await email_taken(session=session, email=new_email):
        raise DuplicateUser("email")

    claimed = await _claim_email_slot(
        session=session,
        user=user,
        sent_at=User.email_change_sent_at,
        interval=current_app.config["EMAIL_CHANGE_INTERVAL"],
    )
    if claimed:
        token = generate_token(
            Purpose.CHANGE_EMAIL,
            {
                "change_email": user.id,
                "old_email": _address_digest(user.email),
                "new_email": new_email,
                # A password change, say by an owner who noticed an intruder,
                # voids the links that the intruder requested before it.
                "password": user.password_fingerprint,
            },
        )
        await send_email_change(user, new_email, token, session=session)
    return claimed


async def change_email(*, session: AsyncSession, token: str) -> User:
    """Apply an address change through a link from a "Confirm Your Email Address" email.

    The account is confirmed too, because the link proves control of the new
    address. A link stops working once the account's address or password
    changes, through this link or any other way. The old address gets a notice
    of the change.

    Raises:
        TokenExpired: the link is older than TOKEN_MAX_AGE.
        TokenInvalid: the link is malformed, tampered with or made for another
            purpose, or the account's address or password is no longer the one
            it had when the link was sent. Of two requests that use one link, or
            two links of one account, at the same time, the one that commits
            second gets this.
        DuplicateUser: another account registered the new address after the
            link was sent (``field == "email"``). The session has been rolled
            back, and the objects in it reloaded, before this is raised.
    """
    payload = load_token(Purpose.CHANGE_EMAIL, token)
    user = await session.get(User, _user_id(payload, "change_email"))
    new_email = payload.get("new_email")
    if (
        user is None
        or not isinstance(new_email, str)
        or _address_digest(user.email) != payload.get("old_email")
        or user.password_fingerprint != payload.get("password")
    ):
        raise TokenInvalid("The email change link was used already or is outdated.")

    # The old address and hash in the WHERE clause make the link single-use
    # when two requests verified it at once: the second UPDATE matches no row.
    old_email = user.email
    try:
        result = await session.execute(
            update(User)
            .where(
                User.id == user.id,
                User.email == old_email,
                User.password_hash == user.password_hash,
            )
            .values(email=new_email, confirmed=True)
            .execution_options(synchronize_session=False)
        )
    except IntegrityError:
        await _roll_back(session)
        raise DuplicateUser("email") from None
    if cast(CursorResult[Any], result).rowcount != 1:
        raise TokenInvalid("The email change link was used already.")
    await session.refresh(user)
    await send_email_changed_notice(user, old_email, session=session)
    return user


async def _check_password(user: User, password: str) -> bool:
    """Verify `password` for `user`, with the lockout of `authenticate`.

    The caller releases its session's connection first (`release_connection`),
    because the count is written in a transaction of its own.

    Raises:
        LoginThrottled: the account is locked out for now.
    """
    # Shielded, so that when the client goes away mid-check the check still
    # runs to its end, and a right password still clears the count.
    return await asyncio.shield(_check_password_in_turn(user, password))


async def _check_password_in_turn(user: User, password: str) -> bool:
    # Checks of one account take turns within this process, so that requests
    # sent at once with the right password do not use up the lockout's
    # allowance while they wait. Across processes the count alone decides.
    async with _account_turn(user.id):
        await _count_password_check(user)
        if not await verify_password(user.password_hash, password):
            return False
        await _clear_failed_logins(user)
        return True


@dataclass
class _AccountTurn:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # Requests that hold or wait for `lock`. The turn is dropped at zero.
    users: int = 0


@asynccontextmanager
async def _account_turn(user_id: int) -> AsyncIterator[None]:
    turns: dict[int, _AccountTurn] = current_app.extensions.setdefault(
        "password_check_turns", {}
    )
    turn = turns.setdefault(user_id, _AccountTurn())
    turn.users += 1
    try:
        async with turn.lock:
            yield
    finally:
        turn.users -= 1
        if turn.users == 0:
            del turns[user_id]


async def _count_password_check(user: User) -> None:
    # Each check counts as a failure before the slow hash starts, and a match
    # clears the count afterwards. One conditional UPDATE decides and counts,
    # so of many requests sent at once no more than LOGIN_MAX_FAILURES get past
    # it. In a transaction of its own, the count stays although the caller
    # commits nothing after a wrong password.
    config = current_app.config
    now = utcnow()
    window_start = now - timedelta(seconds=config["LOGIN_LOCKOUT"])
    async with session_scope() as session:
        result = await session.execute(
            update(User)
            .where(
                User.id == user.id,
                or_(
                    User.failed_logins < config["LOGIN_MAX_FAILURES"],
                    User.last_failed_login_at.is_(None),
                    User.last_failed_login_at <= window_start,
                ),
            )
            .values(
                failed_logins=case(
                    (
                        User.last_failed_login_at > window_start,
                        User.failed_logins + 1,
                    ),
                    else_=1,
                ),
                last_failed_login_at=now,
            )
            .execution_options(synchronize_session=False)
        )
        if cast(CursorResult[Any], result).rowcount == 1:
            await session.commit()
            return

        last_failed = await session.scalar(
            select(User.last_failed_login_at).where(User.id == user.id)
        )
    if last_failed is None:
        # The account was deleted meanwhile, so there is nothing to count.
        return
    unlocks_at = last_failed + timedelta(seconds=config["LOGIN_LOCKOUT"])
    remaining = (unlocks_at - now).total_seconds()
    raise LoginThrottled(max(1, math.ceil(remaining)))


async def _clear_failed_logins(user: User) -> None:
    async with session_scope() as session:
        await session.execute(
            update(User)
            .where(User.id == user.id)
            .values(failed_logins=0, last_failed_login_at=None)
            .execution_options(synchronize_session=False)
        )
        await session.commit()


async def _duplicate_field(
    *, session: AsyncSession, email: str, username: str
) -> str | None:
    if await email_taken(session=session, email=email):
        return "email"
    if await username_taken(session=session, username=username):
        return "username"
    return None


async def _roll_back(session: AsyncSession) -> None:
    await session.rollback()
    # The rollback expired every object the session holds, such as the
    # logged-in user. Reading an expired attribute where nothing awaits, as a
    # template does, raises MissingGreenlet, so they are reloaded here.
    for instance in list(session.identity_map.values()):
        await session.refresh(instance)


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
    # row no longer matches for them, so only one of them sends. With no
    # interval every request sends: comparing times would still drop a request
    # that read the clock just before the one that committed first.
    condition = User.id == user.id
    if interval > 0:
        due = or_(sent_at.is_(None), sent_at <= now - timedelta(seconds=interval))
        condition = and_(condition, due)
    result = await session.execute(
        update(User)
        .where(condition)
        .values({sent_at.key: now})
        .execution_options(synchronize_session=False)
    )
    return cast(CursorResult[Any], result).rowcount == 1


def _address_digest(email: str) -> str:
    # The link goes to the new address, which may be mistyped, so it carries a
    # digest of the current address rather than the address itself.
    return hashlib.sha256(email.encode()).hexdigest()[:16]


def _user_id(payload: dict[str, Any], key: str) -> int:
    user_id = payload.get(key)
    # Ids are 32-bit integers in the database, and PostgreSQL rejects a larger
    # value with an error instead of finding no row.
    if type(user_id) is not int or not 0 < user_id < 2**31:
        raise TokenInvalid("The link does not name a valid account.")
    return user_id
