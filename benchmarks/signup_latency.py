"""Signup latency with an instant relay and with one that takes 2 s to reply to DATA.

Both sides run in one process, one after the other, against real aiosmtpd relays
on 127.0.0.1 and a SQLite file, through Quart's test client. The signup view only
writes the outbox row, so the slow relay should not change its latency: the
printed ratio (slow / instant) stays close to 1, far below the 2 s delay.

Run: .venv/bin/python benchmarks/signup_latency.py [--signups N]
"""

import argparse
import asyncio
import re
import statistics
import tempfile
import time
from pathlib import Path

from aiosmtpd.smtp import SMTP, Envelope, Session
from quart.testing.app import TestApp
from sqlalchemy.ext.asyncio import create_async_engine

from quart_app import create_app
from quart_app.db import Base

RELAY_DELAY = 2.0


class _DelayedRelay:
    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.accepted = 0

    async def handle_DATA(  # noqa: N802 - the name aiosmtpd calls
        self, server: SMTP, session: Session, envelope: Envelope
    ) -> str:
        await asyncio.sleep(self.delay)
        self.accepted += 1
        return "250 OK"


async def _measure(delay: float, signups: int, folder: Path) -> list[float]:
    relay = _DelayedRelay(delay)
    server = await asyncio.get_running_loop().create_server(
        lambda: SMTP(relay), host="127.0.0.1", port=0
    )
    port = server.sockets[0].getsockname()[1]
    database = f"sqlite+aiosqlite:///{folder / f'bench-{delay}.db'}"
    engine = create_async_engine(database)
    async with engine.begin() as connection:
        await connection.run_sync(Base.metadata.create_all)
    await engine.dispose()

    app = create_app(
        {
            "APP_ENV": "testing",
            "DATABASE_URL": database,
            "INSTANCE_PATH": str(folder),
            "MAIL_SERVER": "127.0.0.1",
            "MAIL_PORT": port,
            "APP_BASE_URL": "http://bench.test",
            "BACKGROUND_TASK_SHUTDOWN_TIMEOUT": delay * signups + 30,
            "LOG_LEVEL": "WARNING",
        }
    )
    timings = []
    # Shutdown waits until the relay has accepted every message.
    async with TestApp(app, shutdown_timeout=int(delay * signups) + 60) as test_app:
        client = test_app.test_client()
        for number in range(signups):
            page = await (await client.get("/auth/register")).get_data(as_text=True)
            token = re.search(r'name="csrf_token" type="hidden" value="([^"]+)"', page)
            assert token is not None
            form = {
                "csrf_token": token.group(1),
                "email": f"user{number}@example.com",
                "username": f"user{number}",
                "password": "benchmark password",
                "password2": "benchmark password",
            }
            started = time.perf_counter()
            response = await client.post("/auth/register", form=form)
            timings.append(time.perf_counter() - started)
            assert response.status_code == 302, response.status_code
            await client.get("/auth/logout")
    server.close()
    await server.wait_closed()
    assert relay.accepted == signups, (relay.accepted, signups)
    return timings


async def main(signups: int) -> None:
    with tempfile.TemporaryDirectory() as folder:
        instant = await _measure(0.0, signups, Path(folder))
        slow = await _measure(RELAY_DELAY, signups, Path(folder))
    instant_median = statistics.median(instant)
    slow_median = statistics.median(slow)
    lines = [
        f"signups per side: {signups}",
        f"instant relay: median {instant_median * 1000:.1f} ms, "
        f"max {max(instant) * 1000:.1f} ms",
        f"{RELAY_DELAY:.0f} s relay:   median {slow_median * 1000:.1f} ms, "
        f"max {max(slow) * 1000:.1f} ms",
        f"ratio slow/instant (median): {slow_median / instant_median:.2f}",
        "slowest slow-relay signup as a share of the relay delay: "
        f"{max(slow) / RELAY_DELAY:.3f}",
    ]
    print("\n".join(lines))  # noqa: T201 - the benchmark's report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--signups", type=int, default=20, help="signups per side")
    asyncio.run(main(parser.parse_args().signups))
