"""hypercorn serving the app with more than one worker, and the app's SIGTERM handler.

The SIGTERM handler in a real hypercorn worker is tested against a relay and a
database in test_outbox_processes.py.
"""

import asyncio
import multiprocessing
import re
import signal
from multiprocessing.connection import Connection
from pathlib import Path

import httpx
from quart import Quart

from quart_app import create_app
from quart_app.db import Base, create_engine
from tests.live import live_server, migrated_instance

PASSWORD = "correct horse battery staple"
SIGNUPS = 6


async def _sign_up(base_url: str, number: int) -> None:
    # A client each, so each signup has its own session and CSRF token.
    async with httpx.AsyncClient(base_url=base_url) as client:
        page = await client.get("/auth/register")
        token = re.search(r'name="csrf_token" type="hidden" value="([^"]+)"', page.text)
        assert token is not None
        response = await client.post(
            "/auth/register",
            data={
                "csrf_token": token.group(1),
                "email": f"user{number}@example.com",
                "username": f"user{number}",
                "password": PASSWORD,
                "password2": PASSWORD,
            },
        )
        assert response.status_code == 302, response.text


async def test_two_workers_share_mailbox(tmp_path: Path) -> None:
    instance_path = migrated_instance(tmp_path)
    async with live_server(instance_path, workers=2) as server:
        for number in range(SIGNUPS):
            await _sign_up(server.base_url, number)
        async with httpx.AsyncClient(base_url=server.base_url) as client:
            health = (await client.get("/healthz")).json()

    # Shutdown waited for every send, so the folder is complete now.
    listening = re.findall(
        r"Development mailbox listening on 127\.0\.0\.1:(\d+)", server.log()
    )
    assert len(set(listening)) == 2
    stored = sorted((instance_path / "mailbox").glob("*.eml"))
    assert len(stored) == SIGNUPS
    texts = [path.read_text() for path in stored]
    for number in range(SIGNUPS):
        assert sum(f"user{number}@example.com" in text for text in texts) == 1
    assert health["status"] == "ok"


async def test_mailbox_page_lists_every_worker(tmp_path: Path) -> None:
    instance_path = migrated_instance(tmp_path)
    async with live_server(instance_path, workers=2) as server:
        for number in range(SIGNUPS):
            await _sign_up(server.base_url, number)
    async with live_server(instance_path, workers=2) as server:
        async with httpx.AsyncClient(base_url=server.base_url) as client:
            listing = (await client.get("/dev/mailbox")).text
    assert listing.count("[Quart App] Confirm Your Account") == SIGNUPS


async def test_no_sigterm_handler_under_test_app(app: Quart) -> None:
    before = signal.getsignal(signal.SIGTERM)
    async with app.test_app():
        while_serving = signal.getsignal(signal.SIGTERM)
    assert while_serving == before


def test_no_sigterm_handler_in_other_child(tmp_path: Path) -> None:
    # A child process that hypercorn did not start, with hypercorn imported (Quart
    # imports it), as under another server that runs its workers this way.
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=_serve_and_report_sigterm, args=(tmp_path, sender))
    child.start()
    sender.close()
    try:
        assert receiver.poll(60), "the child process reported nothing within 60 s"
        disposition = receiver.recv()
    finally:
        child.join(60)
        if child.exitcode is None:
            child.kill()
            child.join()
        receiver.close()
    assert child.exitcode == 0
    assert disposition == "SIG_DFL"


def _serve_and_report_sigterm(tmp_path: Path, sender: Connection) -> None:
    database_url = f"sqlite+aiosqlite:///{tmp_path / 'test.db'}"
    app = create_app(
        {
            "APP_ENV": "testing",
            "DATABASE_URL": database_url,
            "INSTANCE_PATH": str(tmp_path / "instance"),
            "MAIL_SERVER": "127.0.0.1",
            "OUTBOX_WORKER": False,
        }
    )

    async def serve() -> object:
        engine = create_engine(database_url)
        async with engine.begin() as connection:
            await connection.run_sync(Base.metadata.create_all)
        await engine.dispose()
        async with app.test_app():
            return signal.getsignal(signal.SIGTERM)

    disposition = asyncio.run(serve())
    sender.send(getattr(disposition, "name", repr(disposition)))
    sender.close()
