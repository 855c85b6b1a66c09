import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from quart import Quart
from sqlalchemy import event, update
from sqlalchemy.ext.asyncio import AsyncSession

from quart_app import accounts
from quart_app.db import create_engine, session_scope
from quart_app.models import User, utcnow
from tests.api import basic_auth
from tests.conftest import (
    PASSWORD,
    Relay,
    csrf_token,
    fetch_users,
    login,
    make_app,
    page_text,
    register,
    serving,
)


def _cookie_header(response: object, name: str) -> str:
    for header in response.headers.getlist("Set-Cookie"):  # type: ignore[attr-defined]
        if header.startswith(f"{name}="):
            return header
    raise AssertionError(f"no {name} cookie set")


@contextlib.asynccontextmanager
async def _hashing_blocked(*apps: Quart) -> AsyncIterator[threading.Event]:
    """Occupy every password hashing thread of `apps` until the gate is set.

    Leaving the block sets the gate. A test that needs the threads back sooner
    sets the yielded gate itself.
    """
    gate = threading.Event()
    loop = asyncio.get_running_loop()
    blockers = [
        loop.run_in_executor(app.extensions["password_hashing"].executor, gate.wait)
        for app in apps
        for _ in range(app.extensions["password_hashing"].workers)
    ]
    try:
        yield gate
    finally:
        gate.set()
        await asyncio.gather(*blockers)


async def test_login_wrong_password(app: Quart, relay: Relay) -> None:
    async with serving(app) as client:
        await register(client)
        await client.get("/auth/logout")
        response = await login(client, password="wrong password")
        assert response.status_code == 200
        assert "Invalid email or password." in await page_text(response)
        assert (await client.get("/auth/unconfirmed")).status_code == 302


async def test_login_unknown_email(app: Quart, relay: Relay) -> None:
    async with serving(app) as client:
        response = await login(client, email="nobody@example.com")
        assert response.status_code == 200
        assert "Invalid email or password." in await page_text(response)


@pytest.mark.parametrize(
    "form",
    [
        {},
        {"email": "alice@example.com"},
        {"password": PASSWORD},
        {"email": "alice@example.com\r\n", "password": PASSWORD + "\n"},
        {"email": "alice@example.com", "password": "p" * 10_000},
    ],
)
async def test_login_malformed_form(app: Quart, relay: Relay, form: dict) -> None:
    async with serving(app) as client:
        await register(client)
        await client.get("/auth/logout")
        token = await csrf_token(client, "/auth/login")
        response = await client.post("/auth/login", form={"csrf_token": token, **form})
        assert response.status_code == 200
        page = await page_text(response)
        assert 'class="error"' in page or "Invalid email or password." in page
        assert (await client.get("/auth/unconfirmed")).status_code == 302


async def test_login_missing_csrf(app: Quart, relay: Relay) -> None:
    async with serving(app) as client:
        await register(client)
        await client.get("/auth/logout")
        response = await client.post(
            "/auth/login", form={"email": "alice@example.com", "password": PASSWORD}
        )
        assert response.status_code == 400
        assert "Set-Cookie" not in response.headers or all(
            not header.startswith("QUART_AUTH=")
            for header in response.headers.getlist("Set-Cookie")
        )


@pytest.mark.parametrize(
    ("next_path", "expected"),
    [
        ("/auth/unconfirmed", "/auth/unconfirmed"),
        ("/?tab=1", "/?tab=1"),
        ("//evil.example/", "/"),
        ("https://evil.example/", "/"),
        ("/\\evil.example", "/"),
        ("javascript:alert(1)", "/"),
        ("", "/"),
        ("/\x7f/evil.example/x", "/"),
        ("/\t/evil.example/x", "/"),
        ("/\u2028/evil.example", "/"),
        ("/\uff0f/evil.example", "/%EF%BC%8F/evil.example"),
        ("/caf\u00e9?q=\u00e9#top", "/caf%C3%A9?q=%C3%A9#top"),
    ],
)
async def test_login_next_only_local(
    app: Quart, relay: Relay, next_path: str, expected: str
) -> None:
    async with serving(app) as client:
        await register(client)
        await client.get("/auth/logout")
        token = await csrf_token(client, "/auth/login")
        response = await client.post(
            "/auth/login",
            form={
                "csrf_token": token,
                "email": "alice@example.com",
                "password": PASSWORD,
            },
            query_string={"next": next_path},
        )
        assert response.status_code == 302
        assert response.headers["Location"] == expected


async def test_login_cookie_flags_development(app: Quart, relay: Relay) -> None:
    async with serving(app) as client:
        await register(client)
        await client.get("/auth/logout")
        response = await login(client)
    cookie = _cookie_header(response, "QUART_AUTH")
    assert "HttpOnly" in cookie
    assert "SameSite=Lax" in cookie
    assert "Secure" not in cookie
    assert "Expires" not in cookie
    assert "Max-Age" not in cookie


async def test_login_remember_me_persists(app: Quart, relay: Relay) -> None:
    async with serving(app) as client:
        await register(client)
        await client.get("/auth/logout")
        response = await login(client, remember_me=True)
    cookie = _cookie_header(response, "QUART_AUTH")
    assert "Max-Age=" in cookie or "Expires=" in cookie


async def test_login_cookie_secure_in_production(
    database_url: str, relay: Relay, tmp_path: Path
) -> None:
    app = make_app(
        database_url,
        relay.port,
        tmp_path,
        APP_ENV="production",
        SECRET_KEY="a production secret for tests",
        APP_BASE_URL="https://app.example",
    )
    async with app.test_app() as test_app:
        client = test_app.test_client()
        page = await client.get("/auth/register", scheme="https")
        text = await page_text(page)
        token = text.split('name="csrf_token" type="hidden" value="')[1].split('"')[0]
        response = await client.post(
            "/auth/register",
            scheme="https",
            form={
                "csrf_token": token,
                "email": "alice@example.com",
                "username": "alice",
                "password": PASSWORD,
                "password2": PASSWORD,
            },
        )
        assert response.status_code == 302
    assert "Secure" in _cookie_header(response, "QUART_AUTH")
    assert "HttpOnly" in _cookie_header(response, "QUART_AUTH")
    assert "Secure" in _cookie_header(response, "session")
    # Production has no development mailbox.
    async with app.test_app() as test_app:
        missing = await test_app.test_client().get("/dev/mailbox", scheme="https")
        assert missing.status_code == 404


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_logout_ends_login(app: Quart, relay: Relay, method: str) -> None:
    async with serving(app) as client:
        await register(client)
        assert (await client.get("/auth/unconfirmed")).status_code == 200
        response = await client.open("/auth/logout", method=method)
        assert response.status_code == 302
        assert (await client.get("/auth/unconfirmed")).status_code == 302
        home = await client.get("/")
        assert "Hello, stranger!" in await page_text(home)


async def test_login_forged_cookie_ignored(app: Quart, relay: Relay) -> None:
    async with serving(app) as client:
        await register(client)
        await client.get("/auth/logout")
        client.set_cookie("localhost", "QUART_AUTH", "1:forged")
        response = await client.get("/")
        assert response.status_code == 200
        assert "Hello, stranger!" in await page_text(response)


async def test_login_waiting_for_hash_holds_no_connection(
    database_url: str, relay: Relay, tmp_path: Path
) -> None:
    # More logins than the pool's 15 connections (5 plus 10 overflow). If each
    # held its connection while it waited for a hashing thread, the pool would
    # run dry and every other page would wait for it.
    logins = 20
    async with serving(make_app(database_url, relay.port, tmp_path)) as client:
        assert (await register(client)).status_code == 302

    # A second app without the delivery loop, so only the logins use its pool,
    # and with a lockout that lets every wrong password be checked.
    app = make_app(
        database_url,
        relay.port,
        tmp_path,
        OUTBOX_WORKER=False,
        LOGIN_MAX_FAILURES=logins,
    )
    async with serving(app) as client:
        forms = []
        for _ in range(logins):
            token = await csrf_token(client, "/auth/login")
            forms.append(
                {"csrf_token": token, "email": "alice@example.com", "password": "x"}
            )

        pool = app.extensions["db_engine"].sync_engine.pool
        returned = 0
        all_returned = asyncio.Event()

        def count_checkin(*_args: Any) -> None:
            nonlocal returned
            returned += 1
            if returned == logins + 1:
                all_returned.set()

        event.listen(pool, "checkin", count_checkin)
        requests: list[asyncio.Task[Any]] = []
        try:
            # With every hashing thread occupied, each login waits in the queue.
            async with _hashing_blocked(app):
                requests = [
                    asyncio.create_task(client.post("/auth/login", form=form))
                    for form in forms
                ]
                # Each login gives its connection back once it has read the
                # user. Logins of one account then take turns, so the first one
                # also counts its attempt and waits for a hash, and the others
                # wait for their turn.
                await asyncio.wait_for(all_returned.wait(), 10)
                health = await asyncio.wait_for(client.get("/healthz"), 10)
                waiting = sum(not request.done() for request in requests)
        finally:
            responses = await asyncio.gather(*requests)
            event.remove(pool, "checkin", count_checkin)

    assert health.status_code == 200
    assert waiting == logins
    assert [response.status_code for response in responses] == [200] * logins


async def _set_last_failure(app: Quart, seconds_ago: int) -> None:
    engine = create_engine(app.config["DATABASE_URL"])
    try:
        async with AsyncSession(engine) as session:
            await session.execute(
                update(User).values(
                    last_failed_login_at=utcnow() - timedelta(seconds=seconds_ago)
                )
            )
            await session.commit()
    finally:
        await engine.dispose()


async def test_login_locked_after_max_failures(
    database_url: str, relay: Relay, tmp_path: Path
) -> None:
    app = make_app(database_url, relay.port, tmp_path, LOGIN_MAX_FAILURES=3)
    async with serving(app) as client:
        await register(client)
        await client.get("/auth/logout")
        for _ in range(3):
            wrong = await login(client, password="wrong password")
            assert wrong.status_code == 200
            assert "Invalid email or password." in await page_text(wrong)
        # Even the right password is not checked while the account is locked.
        locked = await login(client)
        locked_page = await page_text(locked)
    assert locked.status_code == 429
    assert 0 < int(locked.headers["Retry-After"]) <= 900
    assert "Too many wrong passwords for this account" in locked_page
    assert "about 15 minutes" in locked_page
    [user] = await fetch_users(app)
    assert user.failed_logins == 3


async def test_login_lockout_ends_after_period(
    database_url: str, relay: Relay, tmp_path: Path
) -> None:
    app = make_app(database_url, relay.port, tmp_path, LOGIN_MAX_FAILURES=2)
    async with serving(app) as client:
        await register(client)
        await client.get("/auth/logout")
        for _ in range(2):
            await login(client, password="wrong password")
        assert (await login(client)).status_code == 429
        await _set_last_failure(app, seconds_ago=901)
        response = await login(client)
    assert response.status_code == 302
    [user] = await fetch_users(app)
    assert user.failed_logins == 0
    assert user.last_failed_login_at is None


async def test_login_success_restarts_count(
    database_url: str, relay: Relay, tmp_path: Path
) -> None:
    app = make_app(database_url, relay.port, tmp_path, LOGIN_MAX_FAILURES=3)
    async with serving(app) as client:
        await register(client)
        await client.get("/auth/logout")
        for _ in range(2):
            await login(client, password="wrong password")
        assert (await login(client)).status_code == 302
        await client.get("/auth/logout")
        for _ in range(2):
            await login(client, password="wrong password")
        response = await login(client)
    assert response.status_code == 302


async def test_login_old_failures_not_counted(
    database_url: str, relay: Relay, tmp_path: Path
) -> None:
    app = make_app(database_url, relay.port, tmp_path, LOGIN_MAX_FAILURES=2)
    async with serving(app) as client:
        await register(client)
        await client.get("/auth/logout")
        await login(client, password="wrong password")
        # The next failure comes after the lockout period, so it starts a new run.
        await _set_last_failure(app, seconds_ago=901)
        await login(client, password="wrong password")
        response = await login(client)
    assert response.status_code == 302


async def test_login_unknown_address_never_locked(
    database_url: str, relay: Relay, tmp_path: Path
) -> None:
    app = make_app(database_url, relay.port, tmp_path, LOGIN_MAX_FAILURES=1)
    async with serving(app) as client:
        statuses = [
            (await login(client, email="nobody@example.com")).status_code
            for _ in range(3)
        ]
    assert statuses == [200, 200, 200]


async def test_lockout_counts_checks_across_processes(
    database_url: str, relay: Relay, tmp_path: Path
) -> None:
    # Each app stands for one server process. Wrong passwords sent to all of
    # them at once must not all be checked before the first failure is
    # counted, or the lockout would only limit how many requests a guesser
    # keeps in flight.
    maximum, processes = 2, 3
    apps = [
        make_app(database_url, relay.port, tmp_path, LOGIN_MAX_FAILURES=maximum)
        for _ in range(processes)
    ]
    async with serving(apps[0]) as client:
        await register(client)

    async with contextlib.AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(serving(app)) for app in apps]
        forms = []
        for number, client in enumerate(clients):
            token = await csrf_token(client, "/auth/login")
            forms.append(
                {
                    "csrf_token": token,
                    "email": "alice@example.com",
                    "password": f"guess {number}",
                }
            )
        requests: list[asyncio.Task[Any]] = []
        try:
            # With every hashing thread of every app occupied, no password
            # check ends before all the requests have been counted.
            async with _hashing_blocked(*apps):
                requests = [
                    asyncio.create_task(client.post("/auth/login", form=form))
                    for client, form in zip(clients, forms, strict=True)
                ]
                # The request past the maximum ends at once, without a hash.
                throttled = await next(asyncio.as_completed(requests, timeout=10))
                waiting = sum(not request.done() for request in requests)
        finally:
            responses = await asyncio.gather(*requests)

    assert throttled.status_code == 429
    assert waiting == maximum
    statuses = sorted(response.status_code for response in responses)
    assert statuses == [200] * maximum + [429]
    [user] = await fetch_users(apps[0])
    assert user.failed_logins == maximum


async def test_lockout_spares_right_passwords_at_once(
    database_url: str, relay: Relay, tmp_path: Path
) -> None:
    app = make_app(database_url, relay.port, tmp_path, LOGIN_MAX_FAILURES=3)
    async with serving(app) as client:
        await register(client)
        responses = await asyncio.gather(
            *(
                client.post(
                    "/api/tokens", headers=basic_auth("alice@example.com", PASSWORD)
                )
                for _ in range(8)
            )
        )

    assert [response.status_code for response in responses] == [200] * 8
    [user] = await fetch_users(app)
    assert user.failed_logins == 0


async def test_cancelled_check_still_settled(
    database_url: str, relay: Relay, tmp_path: Path
) -> None:
    # A client that goes away while its password is hashed must not leave the
    # attempt counted as a failure: the right password still clears the count.
    # Without the delivery loop, only the login uses the database.
    app = make_app(database_url, relay.port, tmp_path, OUTBOX_WORKER=False)
    async with serving(app) as client:
        await register(client)

    counted = asyncio.Event()
    settled = asyncio.Event()
    checkins = 0

    def count_checkin(*_args: Any) -> None:
        # The login's own session, the count, then the clearing of the count.
        nonlocal checkins
        checkins += 1
        if checkins == 2:
            counted.set()
        if checkins == 3:
            settled.set()

    async with app.test_app(), app.app_context():
        pool = app.extensions["db_engine"].sync_engine.pool
        event.listen(pool, "checkin", count_checkin)
        try:
            async with _hashing_blocked(app) as gate:
                async with session_scope() as session:
                    check = asyncio.create_task(
                        accounts.authenticate(
                            session=session,
                            email="alice@example.com",
                            password=PASSWORD,
                        )
                    )
                    await asyncio.wait_for(counted.wait(), 10)
                    check.cancel()
                    with pytest.raises(asyncio.CancelledError):
                        await check
                gate.set()
                await asyncio.wait_for(settled.wait(), 10)
        finally:
            event.remove(pool, "checkin", count_checkin)

    [user] = await fetch_users(app)
    assert user.failed_logins == 0
    assert user.last_failed_login_at is None
