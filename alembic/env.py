"""Alembic environment, on the async engine and the app's own database URL."""

import asyncio
from logging.config import fileConfig

from sqlalchemy.engine import Connection

from alembic import context
from quart_app import create_app
from quart_app.db import Base, create_engine

# The models must be imported so their tables are on Base.metadata.
from quart_app import models  # noqa: F401  isort: skip

config = context.config
if config.config_file_name is not None:
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = Base.metadata


def _database_url() -> str:
    # An explicit URL (from tests that call alembic's API) wins; otherwise the URL
    # comes from create_app, which reads DATABASE_URL exactly as the server does.
    explicit = config.attributes.get("database_url")
    if explicit:
        return explicit
    return create_app().config["DATABASE_URL"]


def _configure(**options: object) -> None:
    context.configure(
        target_metadata=target_metadata,
        # SQLite cannot ALTER most things in place, so alembic copies the table.
        render_as_batch=True,
        compare_type=True,
        **options,
    )


def run_migrations_offline() -> None:
    _configure(
        url=_database_url(),
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


def _run_sync_migrations(connection: Connection) -> None:
    _configure(connection=connection)
    with context.begin_transaction():
        context.run_migrations()


async def run_migrations_online() -> None:
    engine = create_engine(_database_url())
    try:
        async with engine.connect() as connection:
            await connection.run_sync(_run_sync_migrations)
    finally:
        await engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    asyncio.run(run_migrations_online())
