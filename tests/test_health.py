from pathlib import Path

import pytest
from quart.testing import QuartClient

from quart_app import create_app
from tests.conftest import free_port, serving


async def test_healthz_ok(client: QuartClient) -> None:
    response = await client.get("/healthz")
    assert response.status_code == 200
    body = await response.get_json()
    assert body["status"] == "ok"
    assert body["database"] == "ok"


async def test_healthz_database_down(tmp_path: Path) -> None:
    app = create_app(
        {
            "APP_ENV": "testing",
            "DATABASE_URL": f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/none",
            "INSTANCE_PATH": str(tmp_path),
            "MAIL_SERVER": "127.0.0.1",
        }
    )
    async with serving(app) as client:
        response = await client.get("/healthz")
        assert response.status_code == 503
        body = await response.get_json()
        assert body["status"] == "error"
        assert body["database"] == "unavailable"
        # HTML pages that need no database still work.
        assert (await client.get("/auth/login")).status_code == 200


async def test_unknown_route_404_page(client: QuartClient) -> None:
    response = await client.get("/no/such/page")
    assert response.status_code == 404
    assert "404 Not Found" in await response.get_data(as_text=True)


async def test_wrong_method_405(client: QuartClient) -> None:
    response = await client.delete("/auth/register")
    assert response.status_code == 405


async def test_security_headers(client: QuartClient) -> None:
    response = await client.get("/auth/login")
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Referrer-Policy"] == "no-referrer"
    assert "frame-ancestors 'none'" in response.headers["Content-Security-Policy"]


async def test_missing_schema_logged_at_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    app = create_app(
        {
            "APP_ENV": "testing",
            "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'empty.db'}",
            "INSTANCE_PATH": str(tmp_path),
            "MAIL_SERVER": "127.0.0.1",
        }
    )
    async with serving(app):
        pass
    messages = [record.getMessage() for record in caplog.records]
    assert any("run `alembic upgrade head`" in message for message in messages)


async def test_healthz_missing_schema_one_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    app = create_app(
        {
            "APP_ENV": "testing",
            "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'empty.db'}",
            "INSTANCE_PATH": str(tmp_path),
            "MAIL_SERVER": "127.0.0.1",
            "OUTBOX_WORKER": False,
        }
    )
    async with serving(app) as client:
        response = await client.get("/healthz")
    assert response.status_code == 503
    failures = [
        record.getMessage()
        for record in caplog.records
        if record.getMessage().startswith("Health check failed")
    ]
    assert len(failures) == 1
    assert "no such table" in failures[0]
    # SQLAlchemy puts the statement on further lines, but the log keeps one line.
    assert "\n" not in failures[0]
