import os
import subprocess
import sys
from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection

from quart_app.db import Base, create_engine

ROOT = Path(__file__).resolve().parent.parent


def _alembic(*arguments: str, database_url: str, tmp_path: Path) -> None:
    environment = {
        **os.environ,
        "DATABASE_URL": database_url,
        "INSTANCE_PATH": str(tmp_path / "instance"),
    }
    completed = subprocess.run(
        [sys.executable, "-m", "alembic", *arguments],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stderr


def _differences(connection: Connection) -> list:
    context = MigrationContext.configure(
        connection, opts={"compare_type": True, "render_as_batch": True}
    )
    return compare_metadata(context, Base.metadata)


def _tables(connection: Connection) -> set[str]:
    return set(inspect(connection).get_table_names())


async def test_upgrade_head_matches_models(database_url: str, tmp_path: Path) -> None:
    engine = create_engine(database_url)
    async with engine.begin() as connection:
        await connection.run_sync(Base.metadata.drop_all)
        await connection.execute(text("DROP TABLE IF EXISTS alembic_version"))

    try:
        _alembic("upgrade", "head", database_url=database_url, tmp_path=tmp_path)
        async with engine.connect() as connection:
            assert "users" in await connection.run_sync(_tables)
            assert await connection.run_sync(_differences) == []

        _alembic("downgrade", "base", database_url=database_url, tmp_path=tmp_path)
        async with engine.connect() as connection:
            assert "users" not in await connection.run_sync(_tables)
    finally:
        async with engine.begin() as connection:
            await connection.execute(text("DROP TABLE IF EXISTS alembic_version"))
        await engine.dispose()


def test_upgrade_default_sqlite_in_instance_folder(tmp_path: Path) -> None:
    environment = {
        key: value for key, value in os.environ.items() if key != "DATABASE_URL"
    }
    environment["INSTANCE_PATH"] = str(tmp_path / "instance")
    completed = subprocess.run(
        [sys.executable, "-m", "alembic", "upgrade", "head"],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    assert (tmp_path / "instance" / "app.db").exists()
