import logging

from quart import Blueprint, render_template
from quart.typing import ResponseReturnValue
from quart_schema import document_response, tag
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from quart_app.api.schemas import HealthResponse
from quart_app.db import describe_error, get_session
from quart_app.outbox import outbox_stats

bp = Blueprint("main", __name__)
logger = logging.getLogger(__name__)


@bp.get("/")
async def index() -> ResponseReturnValue:
    return await render_template("index.html")


@bp.get("/healthz")
@tag(["health"])
@document_response(HealthResponse, 200)
@document_response(HealthResponse, 503)
async def healthz() -> ResponseReturnValue:
    """Report whether the database responds, with the outbox counts."""
    session = get_session()
    try:
        await session.execute(text("SELECT 1"))
    except (SQLAlchemyError, OSError) as error:
        logger.error(
            "Health check failed: the database did not respond: %s",
            describe_error(error),
        )
        return {"status": "error", "database": "unavailable"}, 503

    try:
        stats = await outbox_stats(session)
    except SQLAlchemyError as error:
        # The database responds, so the likely cause is a schema that
        # `alembic upgrade head` has not created or updated.
        logger.error(
            "Health check failed: the outbox table could not be read (run "
            "`alembic upgrade head` if the schema is missing or old): %s",
            describe_error(error),
        )
        return {"status": "error", "database": "ok", "outbox": "unavailable"}, 503
    return {"status": "ok", "database": "ok", "outbox": stats}
