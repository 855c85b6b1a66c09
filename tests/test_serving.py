"""hypercorn serving the app in development with more than one worker."""

import re
from pathlib import Path

import httpx

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
