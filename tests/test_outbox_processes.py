"""Outbox delivery across real OS processes, against the recording relay.

Each worker is a child process of the test (`quart --app quart_app outbox
send-pending`, or hypercorn serving the app) in its own process group, with the
app's settings passed in the environment. Each message that a test writes to the
outbox carries a unique `X-Outbox-Test` header, so the relay's record shows which
messages arrived, which were lost and which arrived more than once.
"""

import asyncio
import logging
import os
import re
import secrets
import signal
import sys
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import make_msgid
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
from aiosmtpd.smtp import SMTP
from sqlalchemy import insert, select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from quart_app.config import Settings
from quart_app.db import create_engine
from quart_app.models import OutboxMessage, OutboxStatus
from quart_app.outbox import enqueue
from tests.conftest import BASE_URL, PASSWORD, Relay, free_port

# Figures such as delivered, lost and duplicated counts are logged at INFO, so
# `--log-cli-level=INFO` shows them for a passing run.
logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
TEST_HEADER = "X-Outbox-Test"
# Timeouts in seconds, far above the one or two seconds each step takes, so only
# a hung worker reaches them.
START_TIMEOUT = 30.0
EXIT_TIMEOUT = 30.0
MESSAGE_TIMEOUT = 30.0

_LOOP_STARTED = r"Outbox delivery loop started \(worker (\S+),"
_SENT_LINE = re.compile(r"Outbox (\d+) sent to ")
# Quart's default log format: "[2026-01-31 12:00:00,000] WARNING in delivery: ...".
_PROBLEM_LINE = re.compile(r"^\[[^]]+\] (WARNING|ERROR|CRITICAL) in ")
_CSRF_PATTERN = re.compile(r'name="csrf_token" type="hidden" value="([^"]+)"')
_SIGTERM_IGNORED = r"SIGTERM ignored in hypercorn worker (\d+)"


class Worker:
    """A child process whose merged stdout and stderr lines are collected as it runs.

    The pipe is drained all the time, so a worker that logs a line per message
    never blocks on a full pipe.
    """

    def __init__(self, name: str, process: asyncio.subprocess.Process) -> None:
        self.name = name
        self.process = process
        self.lines: list[str] = []
        self._changed = asyncio.Condition()
        self._ended = False
        self._reader = asyncio.create_task(self._read())

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    async def _read(self) -> None:
        assert self.process.stdout is not None
        async for raw in self.process.stdout:
            async with self._changed:
                self.lines.append(raw.decode(errors="replace").rstrip("\n"))
                self._changed.notify_all()
        async with self._changed:
            self._ended = True
            self._changed.notify_all()

    async def wait_for_line(
        self, pattern: str, within: float = START_TIMEOUT
    ) -> re.Match[str]:
        """Return the match of the first line matching `pattern`, within `within` s."""
        return (await self.wait_for_lines(pattern, 1, within))[0]

    async def wait_for_lines(
        self, pattern: str, count: int, within: float = START_TIMEOUT
    ) -> list[re.Match[str]]:
        """Return the matches of the first `count` lines matching `pattern`."""
        regex = re.compile(pattern)

        async def scan() -> list[re.Match[str]]:
            matches: list[re.Match[str]] = []
            checked = 0
            async with self._changed:
                while True:
                    for line in self.lines[checked:]:
                        match = regex.search(line)
                        if match is not None:
                            matches.append(match)
                            if len(matches) == count:
                                return matches
                    checked = len(self.lines)
                    if self._ended:
                        return matches
                    await self._changed.wait()

        try:
            matches = await asyncio.wait_for(scan(), within)
        except TimeoutError:
            raise AssertionError(
                f"{self.name} printed fewer than {count} lines matching {pattern!r} "
                f"within {within} s. Output:\n{self.output}"
            ) from None
        if len(matches) < count:
            raise AssertionError(
                f"{self.name} closed its output after {len(matches)} of {count} lines "
                f"matching {pattern!r}. Output:\n{self.output}"
            )
        return matches

    async def wait(self, within: float = EXIT_TIMEOUT) -> int:
        """Return the exit code once the process has exited and closed its output."""

        async def exited() -> int:
            code = await self.process.wait()
            # Children of the process may keep its output open after it exited.
            # The shield keeps the reader running if the timeout strikes here.
            await asyncio.shield(self._reader)
            return code

        try:
            return await asyncio.wait_for(exited(), within)
        except TimeoutError:
            raise AssertionError(
                f"{self.name} did not exit and close its output within {within} s."
                f" Output:\n{self.output}"
            ) from None

    async def terminate(self, within: float = EXIT_TIMEOUT) -> int:
        """Send SIGTERM and return the exit code."""
        self.process.send_signal(signal.SIGTERM)
        return await self.wait(within)

    async def kill(self) -> int:
        """Send SIGKILL to the whole process group and return the exit code."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return await self.wait()

    async def close(self) -> None:
        # A process that exited may have left children holding its output open,
        # such as hypercorn workers whose main process was killed.
        if self.process.returncode is None or not self._reader.done():
            await self.kill()
        else:
            await self._reader

    def problems(self) -> list[str]:
        """Return the output lines that the app logged as warnings or errors."""
        return [line for line in self.lines if _PROBLEM_LINE.search(line)]

    def sent_ids(self) -> list[int]:
        """Return the outbox ids of the "Outbox N sent to" lines, in output order."""
        return [
            int(match.group(1))
            for line in self.lines
            if (match := _SENT_LINE.search(line)) is not None
        ]


StartWorker = Callable[..., Awaitable[Worker]]


def app_environment(
    database_url: str, mail_port: int, tmp_path: Path, **settings: Any
) -> dict[str, str]:
    """Return the inherited environment without app settings, plus the test's own."""
    environment = {
        name: value
        for name, value in os.environ.items()
        if name not in Settings.model_fields
    }
    values: dict[str, Any] = {
        "APP_ENV": "testing",
        "DATABASE_URL": database_url,
        "INSTANCE_PATH": tmp_path / "instance",
        "APP_BASE_URL": BASE_URL,
        "MAIL_SERVER": "127.0.0.1",
        "MAIL_PORT": mail_port,
        # Longer than any test keeps DATA waiting, so a held send never times out.
        "MAIL_TIMEOUT": 30,
        "MAIL_RETRY_DELAY": 0.5,
        "MAIL_RETRY_MAX_DELAY": 1,
        "OUTBOX_POLL_INTERVAL": 0.2,
    }
    values.update(settings)
    environment.update({name: str(value) for name, value in values.items()})
    environment["PYTHONUNBUFFERED"] = "1"
    return environment


@pytest.fixture(name="engine")
async def _engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(database_url)
    yield engine
    await engine.dispose()


@pytest.fixture(name="start_worker")
async def _start_worker(database_url: str, relay: Relay) -> AsyncIterator[StartWorker]:
    """Start app processes. Teardown kills those still running."""
    workers: list[Worker] = []

    async def start(name: str, *args: str, env: dict[str, str]) -> Worker:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            *args,
            cwd=ROOT,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
        )
        worker = Worker(name, process)
        workers.append(worker)
        return worker

    yield start
    for worker in workers:
        await worker.close()


def numbered_message(number: int) -> EmailMessage:
    message = EmailMessage()
    message["From"] = "Quart App <noreply@app.test>"
    message["To"] = f"user{number}@example.com"
    message["Subject"] = f"Outbox test {number}"
    message["Message-ID"] = make_msgid(domain="app.test")
    message[TEST_HEADER] = str(number)
    message.set_content(f"Outbox test message {number}.\n")
    return message


async def insert_pending(engine: AsyncEngine, count: int) -> set[str]:
    """Insert `count` due pending rows in one transaction and return their numbers."""
    now = datetime.now(UTC)
    rows = []
    for number in range(count):
        message = numbered_message(number)
        rows.append(
            {
                "sender": "noreply@app.test",
                "recipients": [message["To"]],
                "subject": message["Subject"],
                "message": message.as_bytes(),
                "status": OutboxStatus.PENDING.value,
                "attempts": 0,
                "next_attempt_at": now,
                "created_at": now,
            }
        )
    async with AsyncSession(engine) as session:
        await session.execute(insert(OutboxMessage), rows)
        await session.commit()
    return {str(number) for number in range(count)}


async def outbox_rows(engine: AsyncEngine) -> list[OutboxMessage]:
    async with AsyncSession(engine) as session:
        result = await session.execute(select(OutboxMessage).order_by(OutboxMessage.id))
        return list(result.scalars())


async def receive_all(relay: Relay, expected: set[str], within: float) -> None:
    """Wait until every test number in `expected` has reached the relay."""
    received: set[str] = set()
    try:
        async with asyncio.timeout(within):
            while not expected <= received:
                message = await relay.queue.get()
                received.add(str(message[TEST_HEADER]))
    except TimeoutError:
        missing = sorted(expected - received, key=int)
        raise AssertionError(
            f"{len(missing)} of {len(expected)} messages did not reach the relay "
            f"within {within} s, for example {missing[:10]}"
        ) from None


def delivery_figures(relay: Relay, expected: set[str]) -> dict[str, int]:
    """Count the expected messages delivered, lost and delivered more than once."""
    counts = Counter(str(message[TEST_HEADER]) for message in relay.messages)
    return {
        "delivered": len(expected & counts.keys()),
        "lost": len(expected - counts.keys()),
        "duplicated": sum(count - 1 for count in counts.values() if count > 1),
        "unexpected": len(counts.keys() - expected),
    }


def send_pending_args(*options: str) -> tuple[str, ...]:
    return ("-m", "quart", "--app", "quart_app", "outbox", "send-pending", *options)


async def test_two_workers_deliver_each_once(
    database_url: str,
    relay: Relay,
    engine: AsyncEngine,
    start_worker: StartWorker,
    tmp_path: Path,
) -> None:
    env = app_environment(database_url, relay.port, tmp_path)
    first = await start_worker("worker 1", *send_pending_args(), env=env)
    second = await start_worker("worker 2", *send_pending_args(), env=env)
    # Both loops are polling before any row exists, so both compete for the rows.
    first_id = (await first.wait_for_line(_LOOP_STARTED)).group(1)
    second_id = (await second.wait_for_line(_LOOP_STARTED)).group(1)
    assert first_id != second_id

    expected = await insert_pending(engine, 500)
    await receive_all(relay, expected, within=60)
    first_code = await first.terminate()
    second_code = await second.terminate()

    figures = delivery_figures(relay, expected)
    first_sent = first.sent_ids()
    second_sent = second.sent_ids()
    logger.info(
        "two workers: %s, worker 1 sent %d, worker 2 sent %d",
        figures,
        len(first_sent),
        len(second_sent),
    )
    assert first_code == 0, first.output
    assert second_code == 0, second.output
    assert figures["delivered"] == 500
    assert figures["lost"] == 0
    assert figures["duplicated"] == 0
    assert figures["unexpected"] == 0

    rows = await outbox_rows(engine)
    assert len(rows) == 500
    assert {row.status for row in rows} == {OutboxStatus.SENT.value}
    assert {row.attempts for row in rows} == {1}
    assert {row.lease_owner for row in rows} == {None}
    assert first_sent, f"worker 1 sent nothing:\n{first.output}"
    assert second_sent, f"worker 2 sent nothing:\n{second.output}"
    assert not set(first_sent) & set(second_sent)
    assert sorted(first_sent + second_sent) == [row.id for row in rows]
    assert first.problems() == []
    assert second.problems() == []


async def test_killed_worker_rows_delivered_after_restart(
    database_url: str,
    relay: Relay,
    engine: AsyncEngine,
    start_worker: StartWorker,
    tmp_path: Path,
) -> None:
    # The new worker takes the rows over when the lease written by the killed
    # worker expires, so the short OUTBOX_LEASE must be the killed worker's.
    # The settings require MAIL_TIMEOUT to be at most a quarter of it, and the
    # kill comes right after DATA starts, long before its reply times out.
    env = app_environment(
        database_url, relay.port, tmp_path, OUTBOX_LEASE=6, MAIL_TIMEOUT=1.5
    )
    expected = await insert_pending(engine, 20)
    relay.hold = True
    doomed = await start_worker("killed worker", *send_pending_args(), env=env)
    await asyncio.wait_for(relay.data_started.wait(), START_TIMEOUT)
    assert await doomed.kill() == -signal.SIGKILL
    doomed_id = (await doomed.wait_for_line(_LOOP_STARTED)).group(1)

    rows = await outbox_rows(engine)
    statuses = Counter(row.status for row in rows)
    stuck = {row.id for row in rows if row.status == OutboxStatus.SENDING.value}
    logger.info("killed worker left %d rows in sending", len(stuck))
    assert set(statuses) <= {OutboxStatus.PENDING.value, OutboxStatus.SENDING.value}
    assert stuck, "the killed worker left no row in sending"
    assert {row.lease_owner for row in rows if row.id in stuck} == {doomed_id}
    assert relay.messages == []

    # aiosmtpd (1.4.6, SMTP.eof_received) cancels the handler of a connection
    # that reached EOF. The kernel closed the killed worker's sockets before
    # its exit status was reported, and the loop has read the database since,
    # so the held DATA handlers are cancelled and record nothing on release.
    relay.hold = False
    relay.release.set()
    restarted = await start_worker("restarted worker", *send_pending_args(), env=env)
    await receive_all(relay, expected, within=MESSAGE_TIMEOUT)
    assert await restarted.terminate() == 0, restarted.output

    figures = delivery_figures(relay, expected)
    logger.info("delivery after the restart: %s", figures)
    assert figures["delivered"] == 20
    assert figures["lost"] == 0
    assert figures["duplicated"] == 0
    assert figures["unexpected"] == 0

    rows = await outbox_rows(engine)
    assert {row.status for row in rows} == {OutboxStatus.SENT.value}
    assert {row.id for row in rows if row.attempts == 2} == stuck
    assert {row.attempts for row in rows if row.id not in stuck} == {1}
    assert sorted(restarted.sent_ids()) == [row.id for row in rows]
    takeovers = [line for line in restarted.problems() if "taken over" in line]
    assert len(takeovers) == len(stuck)
    assert [line for line in restarted.problems() if line not in takeovers] == []
    assert all(
        row.last_error is not None and row.last_error.startswith("taken over")
        for row in rows
        if row.id in stuck
    )


async def test_pending_rows_left_by_dead_process_sent(
    database_url: str,
    relay: Relay,
    engine: AsyncEngine,
    start_worker: StartWorker,
    tmp_path: Path,
) -> None:
    # `enqueue` in a plain session commits the rows as a request would, but no
    # background send follows, as when the process dies right after the commit.
    async with AsyncSession(engine) as session:
        for number in range(10):
            await enqueue(numbered_message(number), session=session)
        await session.commit()
    expected = {str(number) for number in range(10)}

    env = app_environment(database_url, relay.port, tmp_path)
    worker = await start_worker("worker", *send_pending_args("--once"), env=env)
    code = await worker.wait()

    figures = delivery_figures(relay, expected)
    logger.info("delivery by send-pending --once: %s", figures)
    assert code == 0, worker.output
    assert "claimed 10 messages" in worker.lines, worker.output
    assert worker.problems() == []
    assert figures["delivered"] == 10
    assert figures["lost"] == 0
    assert figures["duplicated"] == 0
    assert figures["unexpected"] == 0
    rows = await outbox_rows(engine)
    assert {row.status for row in rows} == {OutboxStatus.SENT.value}
    assert {row.attempts for row in rows} == {1}


async def http_request(
    port: int,
    method: str,
    path: str,
    *,
    headers: dict[str, str] | None = None,
    body: bytes = b"",
) -> tuple[int, dict[str, list[str]], str]:
    """Send an HTTP/1.1 request to 127.0.0.1:`port` and return the parsed response."""
    lines = [
        f"{method} {path} HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        "Connection: close",
        f"Content-Length: {len(body)}",
    ]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        await writer.drain()
        response = await asyncio.wait_for(reader.read(), MESSAGE_TIMEOUT)
    finally:
        writer.close()
        await writer.wait_closed()

    head, _, content = response.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    response_headers: dict[str, list[str]] = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        response_headers.setdefault(name.strip().lower(), []).append(value.strip())
    length = response_headers.get("content-length", [str(len(content))])[0]
    assert len(content) == int(length), "the response body was cut short"
    return int(status_line.split()[1]), response_headers, content.decode()


def cookie_header(headers: dict[str, list[str]]) -> str:
    return "; ".join(value.split(";", 1)[0] for value in headers.get("set-cookie", []))


async def register_over_http(port: int, username: str) -> int:
    """Sign up `username`@example.com through the form and return the POST's status."""
    status, headers, page = await http_request(port, "GET", "/auth/register")
    assert status == 200
    token = _CSRF_PATTERN.search(page)
    assert token is not None, page
    form = urlencode(
        {
            "csrf_token": token.group(1),
            "email": f"{username}@example.com",
            "username": username,
            "password": PASSWORD,
            "password2": PASSWORD,
        }
    ).encode()
    status, _, page = await http_request(
        port,
        "POST",
        "/auth/register",
        headers={
            "Content-Type": "application/x-www-form-urlencoded",
            "Cookie": cookie_header(headers),
        },
        body=form,
    )
    return status


async def test_served_signup_delivered_once_relay_up(
    database_url: str,
    engine: AsyncEngine,
    start_worker: StartWorker,
    tmp_path: Path,
) -> None:
    smtp_port = free_port()
    http_port = free_port()
    # Enough attempts that the row is still pending when the relay comes up.
    env = app_environment(database_url, smtp_port, tmp_path, MAIL_MAX_ATTEMPTS=100)
    server = await start_worker(
        "hypercorn",
        "-m",
        "hypercorn",
        "--bind",
        f"127.0.0.1:{http_port}",
        "quart_app:create_app()",
        env=env,
    )
    await server.wait_for_line(rf"Running on http://127\.0\.0\.1:{http_port}")

    status = await register_over_http(http_port, "alice")
    assert status == 302, server.output

    # Nothing listens on the relay port yet, so the send after the commit fails.
    await server.wait_for_line(r"Outbox \d+ attempt 1 to alice@example\.com .*failed")
    rows = await outbox_rows(engine)
    assert len(rows) == 1
    # The loop may be in its next attempt already, which also fails.
    assert rows[0].status in (OutboxStatus.PENDING.value, OutboxStatus.SENDING.value)
    assert rows[0].last_error is not None

    late_relay = Relay(port=smtp_port)
    loop = asyncio.get_running_loop()
    smtp_server = await loop.create_server(
        lambda: SMTP(late_relay, hostname="relay.test"),
        host="127.0.0.1",
        port=smtp_port,
    )
    try:
        message = await late_relay.next_message(within=MESSAGE_TIMEOUT)
        await server.wait_for_line(r"Outbox \d+ sent to alice@example\.com")
        assert await server.terminate() == 0, server.output
    finally:
        smtp_server.close()
        await smtp_server.wait_closed()

    assert message["To"] == "alice@example.com"
    assert len(late_relay.messages) == 1
    rows = await outbox_rows(engine)
    assert [row.status for row in rows] == [OutboxStatus.SENT.value]
    assert rows[0].attempts >= 2


async def start_hypercorn(
    start_worker: StartWorker, env: dict[str, str], *, workers: int
) -> tuple[Worker, int, list[int]]:
    """Serve the app with hypercorn.toml and `workers` worker processes.

    Returns the server, its port and the process ids of the workers, once every
    worker is serving.
    """
    port = free_port()
    server = await start_worker(
        "hypercorn",
        "-m",
        "hypercorn",
        "--config",
        "hypercorn.toml",
        "--bind",
        f"127.0.0.1:{port}",
        "--workers",
        str(workers),
        "quart_app:create_app()",
        env=env,
    )
    # hypercorn's log format puts the process id in brackets before the level.
    running = await server.wait_for_lines(
        rf"\[(\d+)\] \[INFO\] Running on http://127\.0\.0\.1:{port} ", workers
    )
    return server, port, [int(match.group(1)) for match in running]


async def test_sigterm_lets_held_send_finish(
    database_url: str,
    relay: Relay,
    engine: AsyncEngine,
    start_worker: StartWorker,
    tmp_path: Path,
) -> None:
    env = app_environment(
        database_url,
        relay.port,
        tmp_path,
        # Quart waits this long for the held send at shutdown, far longer than
        # the test takes to release it.
        BACKGROUND_TASK_SHUTDOWN_TIMEOUT=20,
        # The form and its POST may reach different workers, which must share
        # the key that signs the session and its CSRF token.
        SECRET_KEY=secrets.token_urlsafe(32),
    )
    server, port, worker_pids = await start_hypercorn(start_worker, env, workers=2)
    relay.hold = True
    assert await register_over_http(port, "alice") == 302, server.output
    await asyncio.wait_for(relay.data_started.wait(), MESSAGE_TIMEOUT)

    # The idle worker exits at once. hypercorn's main process then sends SIGTERM
    # to the worker whose send the relay holds, which has to ignore it.
    server.process.send_signal(signal.SIGTERM)
    ignored = await server.wait_for_line(_SIGTERM_IGNORED, within=EXIT_TIMEOUT)
    relay.release.set()
    message = await relay.next_message(within=MESSAGE_TIMEOUT)
    code = await server.wait()

    assert code == 0, server.output
    assert int(ignored.group(1)) in worker_pids
    assert message["To"] == "alice@example.com"
    assert len(relay.messages) == 1
    rows = await outbox_rows(engine)
    assert [row.status for row in rows] == [OutboxStatus.SENT.value]
    assert rows[0].attempts == 1
    assert [line for line in server.problems() if "SIGTERM ignored" not in line] == []


async def test_orphaned_worker_exits_on_sigterm(
    database_url: str,
    relay: Relay,
    start_worker: StartWorker,
    tmp_path: Path,
) -> None:
    env = app_environment(database_url, relay.port, tmp_path)
    server, _, (worker_pid,) = await start_hypercorn(start_worker, env, workers=1)
    # asyncio's Process.wait() (Python 3.11) may also wait for the output pipe,
    # which the worker keeps open, so the main process's exit is watched through
    # a pidfd. It becomes readable after the kernel closed the main process's
    # files, which is how the worker learns that its parent is gone.
    main_exited = asyncio.Event()
    pidfd = os.pidfd_open(server.process.pid)
    loop = asyncio.get_running_loop()
    loop.add_reader(pidfd, main_exited.set)
    try:
        server.process.kill()
        await asyncio.wait_for(main_exited.wait(), EXIT_TIMEOUT)
    finally:
        loop.remove_reader(pidfd)
        os.close(pidfd)

    os.kill(worker_pid, signal.SIGTERM)
    # The worker shares the main process's output pipe, so the output ends only
    # once the worker has exited too.
    assert await server.wait() == -signal.SIGKILL
    assert not [line for line in server.lines if "SIGTERM ignored" in line]
