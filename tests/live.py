"""A live hypercorn server for end-to-end tests, on a free port of 127.0.0.1.

The server runs the app in development with a fresh instance folder, so the
development mailbox catches every email it sends.
"""

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from quart_app.config import Settings
from tests.conftest import free_port

PROJECT_ROOT = Path(__file__).resolve().parent.parent

# Seconds.
MIGRATION_TIMEOUT = 60
STARTUP_TIMEOUT = 30
# Longer than graceful_timeout in hypercorn.toml (15 s), so a clean shutdown can
# finish before the test kills the server.
SHUTDOWN_TIMEOUT = 20


@dataclass
class LiveServer:
    """A running hypercorn process and everything it has written so far."""

    base_url: str
    process: asyncio.subprocess.Process
    output: list[str] = field(default_factory=list)

    def record(self, line: str) -> None:
        self.output.append(line)
        # pytest captures stderr and shows it in the report of a failed test.
        sys.stderr.write(line)

    def log(self) -> str:
        return "".join(self.output)


def app_environment(instance_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    # No app setting from the outer environment may reach the server. A
    # MAIL_SERVER would turn off the development mailbox, and a DATABASE_URL
    # would point the test at another database.
    for name in Settings.model_fields:
        env.pop(name, None)
    env["APP_ENV"] = "development"
    env["INSTANCE_PATH"] = str(instance_path)
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")])
    )
    return env


async def _read_until_running(server: LiveServer, marker: str) -> None:
    stream = server.process.stdout
    assert stream is not None
    while True:
        line = (await stream.readline()).decode(errors="replace")
        if not line:
            await server.process.wait()
            pytest.fail(
                f"hypercorn exited with code {server.process.returncode} before "
                f"serving:\n{server.log()}"
            )
        server.record(line)
        if marker in line:
            return


async def _drain(server: LiveServer) -> None:
    stream = server.process.stdout
    assert stream is not None
    while line := await stream.readline():
        server.record(line.decode(errors="replace"))


async def _stop(process: asyncio.subprocess.Process) -> bool:
    """Stop hypercorn with SIGTERM, or kill its process group after the timeout.

    Returns whether it had to be killed.
    """
    if process.returncode is None:
        process.terminate()
    try:
        async with asyncio.timeout(SHUTDOWN_TIMEOUT):
            await process.wait()
    except TimeoutError:
        # Killing only the parent would leave its worker running and holding the
        # output pipe open.
        os.killpg(process.pid, signal.SIGKILL)
        await process.wait()
        return True
    return False


def migrated_instance(tmp_path: Path) -> Path:
    """Create a fresh instance folder and apply the migrations to its database."""
    path = tmp_path / "instance"
    path.mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "alembic", "upgrade", "head"],
        cwd=PROJECT_ROOT,
        env=app_environment(path),
        capture_output=True,
        text=True,
        timeout=MIGRATION_TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, (
        f"alembic upgrade head failed with code {result.returncode}:\n"
        f"{result.stdout}{result.stderr}"
    )
    return path


@asynccontextmanager
async def live_server(
    instance_path: Path, *, workers: int = 1
) -> AsyncIterator[LiveServer]:
    """Start hypercorn on a free port and stop it with SIGTERM at the end.

    Leaving the block fails the test if hypercorn had to be killed or exited
    with a code other than 0.
    """
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "hypercorn",
        "--config",
        "hypercorn.toml",
        "--bind",
        f"127.0.0.1:{port}",
        "--workers",
        str(workers),
        "quart_app:create_app()",
        cwd=PROJECT_ROOT,
        env=app_environment(instance_path) | {"APP_BASE_URL": base_url},
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        # A group of its own lets a forced stop reach hypercorn's worker process too.
        process_group=0,
    )
    server = LiveServer(base_url=base_url, process=process)
    drain: asyncio.Task[None] | None = None
    try:
        try:
            async with asyncio.timeout(STARTUP_TIMEOUT):
                await _read_until_running(server, f"Running on {base_url}")
        except TimeoutError:
            pytest.fail(
                f"hypercorn did not report 'Running on {base_url}' within "
                f"{STARTUP_TIMEOUT} s:\n{server.log()}"
            )
        # Reading the rest of the output keeps the pipe from filling up, which
        # would block the server on its next log line.
        drain = asyncio.create_task(_drain(server))
        yield server
    finally:
        killed = await _stop(process)
        if drain is not None:
            await drain
        else:
            await _drain(server)

    assert not killed, (
        f"hypercorn did not exit within {SHUTDOWN_TIMEOUT} s of SIGTERM and was "
        f"killed:\n{server.log()}"
    )
    assert process.returncode == 0, (
        f"hypercorn exited with code {process.returncode} after SIGTERM:\n"
        f"{server.log()}"
    )
