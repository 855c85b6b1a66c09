"""The database engine and the per-request session.

The engine is made when serving starts and disposed when it stops, so importing the
package or building the app opens no connection.
"""

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from quart import Quart, current_app, g
from sqlalchemy import MetaData, event, inspect
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import DeclarativeBase, ORMExecuteState, Session

logger = logging.getLogger(__name__)

# Named constraints let alembic alter SQLite tables in batch mode and keep
# autogenerate stable across databases.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class AppSession(Session):
    """The app's sync session class, so its events concern only the app's sessions."""


# Session.info key, true once the current transaction has written something.
_WROTE = "db_wrote"


def create_engine(url: str) -> AsyncEngine:
    """Create the async engine for `url`, with SQLite tuned for several writers."""
    options: dict[str, Any] = {"pool_pre_ping": True}
    if make_url(url).get_backend_name() == "sqlite":
        options = {"connect_args": {"timeout": 30}}
    engine = create_async_engine(url, **options)
    if engine.dialect.name == "sqlite":
        event.listen(engine.sync_engine, "connect", _configure_sqlite)
    return engine


def init_app(app: Quart) -> None:
    """Open the engine when serving starts and dispose of it when serving stops.

    Call it before the extensions that use the database: its opening step then
    runs before theirs, and its disposal, registered by `dispose_last`, after
    theirs.
    """

    @app.before_serving
    async def _open_engine() -> None:
        engine = create_engine(app.config["DATABASE_URL"])
        app.extensions["db_engine"] = engine
        app.extensions["db_sessionmaker"] = async_sessionmaker(
            engine, expire_on_commit=False, sync_session_class=AppSession
        )
        await _check_schema(engine)

    @app.teardown_appcontext
    async def _close_session(_error: BaseException | None) -> None:
        session = g.pop("db_session", None)
        if session is not None:
            await session.close()


def dispose_last(app: Quart) -> None:
    """Dispose of the engine after every after_serving function registered so far.

    Quart runs after_serving functions in the order they were registered, so
    calling this at the end of create_app lets the others still use the database.
    """

    @app.after_serving
    async def _dispose_engine() -> None:
        engine = app.extensions.pop("db_engine", None)
        app.extensions.pop("db_sessionmaker", None)
        if engine is not None:
            await engine.dispose()


def get_session() -> AsyncSession:
    """Return the session of the current app context, opening it on first use.

    The session closes when the app context ends, so a request or a background task
    gets its own session and never shares one with another.
    """
    session: AsyncSession | None = g.get("db_session")
    if session is None:
        session = _sessionmaker()()
        g.db_session = session
    return session


@asynccontextmanager
async def session_scope() -> AsyncIterator[AsyncSession]:
    """Open a session outside the per-request one, for CLI commands and workers."""
    async with _sessionmaker()() as session:
        yield session


def get_engine() -> AsyncEngine:
    try:
        engine: AsyncEngine = current_app.extensions["db_engine"]
    except KeyError:
        raise RuntimeError(
            "The database engine is not open: it opens when serving starts, "
            "so use app.test_app() in tests."
        ) from None
    return engine


async def release_connection(session: AsyncSession) -> None:
    """End `session`'s transaction if it has written nothing, freeing its connection.

    A session keeps its pooled connection from its first query until it commits,
    rolls back or closes. Call this before a slow step that needs no database,
    such as a password hash, so that requests queued for that step do not hold
    every connection of the pool. Loaded objects stay usable, because the
    sessions do not expire them on commit. A transaction that has written
    something is left open for its owner to commit.
    """
    sync_session = session.sync_session
    if sync_session.info.get(_WROTE) or (
        sync_session.new or sync_session.dirty or sync_session.deleted
    ):
        return
    if session.in_transaction():
        await session.commit()


def describe_error(error: BaseException) -> str:
    """Return the first line of `error`'s message, for a one-line log entry.

    SQLAlchemy appends the SQL statement and its parameters on further lines,
    which would split the entry and could put an address from a form in the log.
    """
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _sessionmaker() -> async_sessionmaker[AsyncSession]:
    get_engine()
    maker: async_sessionmaker[AsyncSession] = current_app.extensions["db_sessionmaker"]
    return maker


async def _check_schema(engine: AsyncEngine) -> None:
    # The app still starts, so /healthz can report the problem, but the log
    # states at once what is wrong and how to fix it.
    shown_url = engine.url.render_as_string(hide_password=True)
    try:
        async with engine.connect() as connection:
            tables = await connection.run_sync(
                lambda sync: set(inspect(sync).get_table_names())
            )
    except (SQLAlchemyError, OSError) as error:
        logger.error(
            "The database at %s did not respond at start-up: %s",
            shown_url,
            describe_error(error),
        )
        return
    missing = sorted(set(Base.metadata.tables) - tables)
    if missing:
        logger.error(
            "The database at %s has no table %s: run `alembic upgrade head` first",
            shown_url,
            ", ".join(missing),
        )


def _configure_sqlite(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets readers go on while one worker writes; busy_timeout makes a
    # second writer wait for the lock instead of failing at once.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


@event.listens_for(AppSession, "after_flush")
def _note_flush(session: Session, _flush_context: Any) -> None:
    session.info[_WROTE] = True


@event.listens_for(AppSession, "do_orm_execute")
def _note_write(state: ORMExecuteState) -> None:
    if state.is_insert or state.is_update or state.is_delete:
        state.session.info[_WROTE] = True


@event.listens_for(AppSession, "after_commit")
@event.listens_for(AppSession, "after_rollback")
def _forget_writes(session: Session) -> None:
    session.info.pop(_WROTE, None)
