"""The account operations called directly, as the JSON API calls them."""

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from argon2 import PasswordHasher
from quart import Quart
from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncSession

from quart_app import accounts
from quart_app.db import get_session, release_connection, session_scope
from quart_app.errors import (
    DuplicateUser,
    IncorrectPassword,
    LoginThrottled,
    TokenError,
    TokenInvalid,
)
from quart_app.models import Role, User
from quart_app.tokens import Purpose, load_token
from tests.conftest import (
    ADMIN_EMAIL,
    PASSWORD,
    Relay,
    confirm_link,
    fetch_outbox,
    fetch_users,
    link_to,
    make_app,
    next_message_about,
)


@asynccontextmanager
async def _session(app: Quart) -> AsyncIterator[AsyncSession]:
    """Serve `app` and yield a session in a request context, as a view gets."""
    async with app.test_app(), app.test_request_context("/"):
        yield get_session()


async def _register(
    session: AsyncSession, *, email: str = "alice@example.com", username: str = "alice"
) -> User:
    user = await accounts.register_user(
        session=session, email=email, username=username, password=PASSWORD
    )
    await session.commit()
    return user


async def test_register_user_queues_both_emails(app: Quart, relay: Relay) -> None:
    async with _session(app) as session:
        user = await _register(session, email=" Admin@Example.COM ")
        role = user.role
    subjects = sorted(message["Subject"] for message in relay.messages)
    assert subjects == ["[Quart App] Confirm Your Account", "[Quart App] New User"]
    assert user.email == ADMIN_EMAIL
    assert role is Role.ADMINISTRATOR
    assert not user.confirmed


async def test_register_user_uncommitted_sends_nothing(
    app: Quart, relay: Relay
) -> None:
    async with _session(app) as session:
        await accounts.register_user(
            session=session,
            email="alice@example.com",
            username="alice",
            password=PASSWORD,
        )
        await session.rollback()
    assert await fetch_users(app) == []
    assert await fetch_outbox(app) == []
    assert relay.messages == []


@pytest.mark.parametrize(
    ("email", "username", "field"),
    [
        ("ALICE@example.com", "alice2", "email"),
        ("bob@example.com", "ALICE", "username"),
    ],
)
async def test_register_user_duplicate_any_case(
    app: Quart, relay: Relay, email: str, username: str, field: str
) -> None:
    async with _session(app) as session:
        await _register(session)
        with pytest.raises(DuplicateUser) as raised:
            await _register(session, email=email, username=username)
    assert raised.value.field == field
    assert len(await fetch_users(app)) == 1


async def test_register_user_race_on_username(
    app: Quart, relay: Relay, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The first check misses the existing user, as it would if that user had
    # committed just after the check, so the unique index must catch it.
    username_taken = accounts.username_taken
    checks: list[object] = []

    async def _missed_once(**arguments: Any) -> bool:
        checks.append(arguments)
        return len(checks) > 1 and await username_taken(**arguments)

    async with _session(app) as session:
        await _register(session)
        monkeypatch.setattr(accounts, "username_taken", _missed_once)
        with pytest.raises(DuplicateUser) as raised:
            await _register(session, email="bob@example.com")
        # The session was rolled back, so it is usable again.
        assert await _register(session, email="bob@example.com", username="bob")
    assert raised.value.field == "username"
    assert [user.username for user in await fetch_users(app)] == ["alice", "bob"]


async def test_authenticate_checks_password(app: Quart, relay: Relay) -> None:
    async with _session(app) as session:
        user = await _register(session)
        found = await accounts.authenticate(
            session=session, email="Alice@Example.com", password=PASSWORD
        )
        wrong = await accounts.authenticate(
            session=session, email="alice@example.com", password="wrong password"
        )
        unknown = await accounts.authenticate(
            session=session, email="nobody@example.com", password=PASSWORD
        )
    assert found is user
    assert wrong is None
    assert unknown is None


async def test_authenticate_rehashes_old_parameters(app: Quart, relay: Relay) -> None:
    old_hash = PasswordHasher(time_cost=2, memory_cost=16, parallelism=1).hash(PASSWORD)
    async with _session(app) as session:
        user = await _register(session)
        user.password_hash = old_hash
        await session.commit()
        found = await accounts.authenticate(
            session=session, email="alice@example.com", password=PASSWORD
        )
        await session.commit()
    [stored] = await fetch_users(app)
    assert found is user
    assert stored.password_hash != old_hash
    assert "$m=8,t=1,p=1$" in stored.password_hash


async def test_confirm_account_reports_already_confirmed(
    app: Quart, relay: Relay
) -> None:
    async with _session(app) as session:
        await _register(session)
        message = await relay.next_message()
        while "Confirm Your Account" not in message["Subject"]:
            message = await relay.next_message()
        token = confirm_link(message).rsplit("/", 1)[1]
        user, first_already = await accounts.confirm_account(
            session=session, token=token
        )
        await session.commit()
        _, second_already = await accounts.confirm_account(session=session, token=token)
    assert user.confirmed
    assert not first_already
    assert second_already


async def test_confirm_account_bad_token(app: Quart, relay: Relay) -> None:
    async with _session(app) as session:
        with pytest.raises(TokenInvalid):
            await accounts.confirm_account(session=session, token="garbage")


async def test_resend_confirmation_interval(
    database_url: str, relay: Relay, tmp_path: Path
) -> None:
    app = make_app(database_url, relay.port, tmp_path, CONFIRMATION_RESEND_INTERVAL=60)
    async with _session(app) as session:
        user = await _register(session)
        # Signup counts as the first email, so a resend right after is too soon.
        too_soon = await accounts.resend_confirmation(session=session, user=user)
    assert too_soon is False
    subjects = [message["Subject"] for message in relay.messages]
    assert subjects.count("[Quart App] Confirm Your Account") == 1


async def test_resend_confirmation_queues_email(app: Quart, relay: Relay) -> None:
    async with _session(app) as session:
        user = await _register(session)
        sent = await accounts.resend_confirmation(session=session, user=user)
        await session.commit()
    assert sent is True
    subjects = [message["Subject"] for message in relay.messages]
    assert subjects.count("[Quart App] Confirm Your Account") == 2


async def test_request_password_reset_unknown_address(app: Quart, relay: Relay) -> None:
    async with _session(app) as session:
        await _register(session)
        result = await accounts.request_password_reset(
            session=session, email="nobody@example.com"
        )
        await session.commit()
    assert result is None
    assert [row.subject for row in await fetch_outbox(app)] == [
        "[Quart App] Confirm Your Account",
        "[Quart App] New User",
    ]


async def test_reset_password_concurrent_use_once(app: Quart, relay: Relay) -> None:
    async with _session(app) as session:
        await _register(session)
        await accounts.request_password_reset(
            session=session, email="alice@example.com"
        )
        await session.commit()
        message = await next_message_about(relay, "Reset Your Password")
        token = link_to(message, "/auth/reset/").rsplit("/", 1)[1]

        async def _reset(password: str) -> User | TokenError:
            async with session_scope() as own_session:
                try:
                    user = await accounts.reset_password(
                        session=own_session, token=token, password=password
                    )
                except TokenError as error:
                    return error
                await own_session.commit()
                return user

        outcomes = await asyncio.gather(
            _reset("first new password"), _reset("second new password")
        )
    winners = [outcome for outcome in outcomes if isinstance(outcome, User)]
    losers = [outcome for outcome in outcomes if isinstance(outcome, TokenInvalid)]
    assert len(winners) == 1
    assert len(losers) == 1
    [stored] = await fetch_users(app)
    assert stored.password_hash == winners[0].password_hash
    assert stored.confirmed


async def test_change_password_wrong_old_password(app: Quart, relay: Relay) -> None:
    async with _session(app) as session:
        user = await _register(session)
        old_hash = user.password_hash
        changed = await accounts.change_password(
            session=session, user=user, old_password="wrong", password="new password"
        )
    assert changed is False
    assert user.password_hash == old_hash


async def test_request_email_change_wrong_password(app: Quart, relay: Relay) -> None:
    async with _session(app) as session:
        user = await _register(session)
        with pytest.raises(IncorrectPassword):
            await accounts.request_email_change(
                session=session,
                user=user,
                new_email="new@example.com",
                password="wrong",
            )


async def test_request_email_change_own_address(app: Quart, relay: Relay) -> None:
    async with _session(app) as session:
        user = await _register(session)
        with pytest.raises(DuplicateUser) as raised:
            await accounts.request_email_change(
                session=session,
                user=user,
                new_email="ALICE@example.com",
                password=PASSWORD,
            )
    assert raised.value.field == "email"


async def test_change_email_token_hides_old_address(app: Quart, relay: Relay) -> None:
    # The link goes to the new address, which may be a stranger's if mistyped.
    async with _session(app) as session:
        user = await _register(session)
        sent = await accounts.request_email_change(
            session=session, user=user, new_email="new@example.com", password=PASSWORD
        )
        await session.commit()
        message = await next_message_about(relay, "Confirm Your Email Address")
        token = link_to(message, "/auth/change-email/").rsplit("/", 1)[1]
        payload = load_token(Purpose.CHANGE_EMAIL, token)
    assert sent is True
    assert "alice@example.com" not in json.dumps(payload)
    assert "alice@example.com" not in str(message)


async def test_change_email_unique_index_race(
    app: Quart, relay: Relay, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The check misses a user who took the address just before, so the unique
    # index must catch it, and the session must be usable afterwards.
    async with _session(app) as session:
        user = await _register(session)
        await accounts.request_email_change(
            session=session, user=user, new_email="bob@example.com", password=PASSWORD
        )
        await session.commit()
        message = await next_message_about(relay, "Confirm Your Email Address")
        token = link_to(message, "/auth/change-email/").rsplit("/", 1)[1]
        await _register(session, email="bob@example.com", username="bob")

        async def _never_taken(**_arguments: Any) -> bool:
            return False

        monkeypatch.setattr(accounts, "email_taken", _never_taken)
        with pytest.raises(DuplicateUser) as raised:
            await accounts.change_email(session=session, token=token)
        assert await session.get(User, user.id) is not None
    assert raised.value.field == "email"
    assert [user.email for user in await fetch_users(app)] == [
        "alice@example.com",
        "bob@example.com",
    ]


async def test_release_connection_keeps_writes_open(app: Quart, relay: Relay) -> None:
    async with _session(app) as session:
        user = await _register(session)
        await session.execute(
            update(User).where(User.id == user.id).values(username="changed")
        )
        await release_connection(session)
        still_open = session.in_transaction()
        await session.rollback()
    [stored] = await fetch_users(app)
    assert still_open
    assert stored.username == "alice"


async def test_release_connection_ends_read(app: Quart, relay: Relay) -> None:
    async with _session(app) as session:
        user = await _register(session)
        await session.get(User, user.id, populate_existing=True)
        await release_connection(session)
        ended = not session.in_transaction()
        username = user.username
    assert ended
    assert username == "alice"


async def test_admin_role_left_behind_on_move(app: Quart, relay: Relay) -> None:
    # Someone signs up with the APP_ADMIN address before its owner, then moves
    # to an address of their own, which confirms the account.
    async with _session(app) as session:
        user = await _register(session, email=ADMIN_EMAIL, username="squatter")
        await accounts.request_email_change(
            session=session,
            user=user,
            new_email="eve@attacker.example",
            password=PASSWORD,
        )
        await session.commit()
        message = await next_message_about(relay, "Confirm Your Email Address")
        token = link_to(message, "/auth/change-email/").rsplit("/", 1)[1]
        moved = await accounts.change_email(session=session, token=token)
        await session.commit()
        role = moved.role
        administrator = moved.is_administrator
    assert moved.confirmed
    assert role is Role.USER
    assert not administrator


async def test_admin_role_follows_setting(
    database_url: str, relay: Relay, tmp_path: Path
) -> None:
    first = make_app(database_url, relay.port, tmp_path)
    async with _session(first) as session:
        user = await _register(session, email="carol@example.com", username="carol")
        user.confirmed = True
        await session.commit()
        before = user.is_administrator

    second = make_app(database_url, relay.port, tmp_path, APP_ADMIN="Carol@Example.com")
    async with _session(second) as session:
        reloaded = await session.get(User, user.id)
        assert reloaded is not None
        after = reloaded.is_administrator
    assert not before
    assert after


async def test_reset_password_ends_lockout(
    database_url: str, relay: Relay, tmp_path: Path
) -> None:
    app = make_app(database_url, relay.port, tmp_path, LOGIN_MAX_FAILURES=1)
    async with _session(app) as session:
        await _register(session)
        wrong = await accounts.authenticate(
            session=session, email="alice@example.com", password="wrong"
        )
        with pytest.raises(LoginThrottled):
            await accounts.authenticate(
                session=session, email="alice@example.com", password=PASSWORD
            )
        await accounts.request_password_reset(
            session=session, email="alice@example.com"
        )
        await session.commit()
        message = await next_message_about(relay, "Reset Your Password")
        token = link_to(message, "/auth/reset/").rsplit("/", 1)[1]
        await accounts.reset_password(
            session=session, token=token, password="a new passphrase"
        )
        await session.commit()
        user = await accounts.authenticate(
            session=session, email="alice@example.com", password="a new passphrase"
        )
    assert wrong is None
    assert user is not None
