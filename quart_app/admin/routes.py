import math

from quart import (
    Blueprint,
    abort,
    flash,
    g,
    redirect,
    render_template,
    request,
    url_for,
)
from quart.typing import ResponseReturnValue
from sqlalchemy import func, select

from quart_app.auth.forms import EmptyForm
from quart_app.db import get_session
from quart_app.errors import OutboxMessageNotFailed, OutboxMessageNotFound
from quart_app.models import MAX_ID, OutboxMessage, OutboxStatus, User
from quart_app.outbox import retry_message

bp = Blueprint("admin", __name__, url_prefix="/admin")

PAGE_SIZE = 50
STATUSES = [status.value for status in OutboxStatus]


@bp.before_request
async def require_administrator() -> ResponseReturnValue | None:
    # load_account sends an unconfirmed account to /auth/unconfirmed before it
    # gets here, and `is_administrator` requires a confirmed address as well.
    account: User | None = g.account
    if account is None:
        # After the login the browser GETs `next`, a method the retry route does
        # not accept, so a POST returns to the outbox page instead.
        if request.method == "GET":
            target = request.full_path.rstrip("?")
        else:
            target = url_for("admin.outbox")
        return redirect(url_for("auth.login", next=target))
    if not account.is_administrator:
        abort(403, "Only an administrator may open this page.")
    return None


@bp.get("/outbox")
async def outbox() -> ResponseReturnValue:
    status = _status_filter(request.args.get("status"))
    session = get_session()
    filters = [] if status is None else [OutboxMessage.status == status]
    total = (
        await session.execute(
            select(func.count()).select_from(OutboxMessage).where(*filters)
        )
    ).scalar_one()

    pages = max(1, math.ceil(total / PAGE_SIZE))
    page = min(max(request.args.get("page", 1, type=int), 1), pages)
    rows = (
        await session.execute(
            select(OutboxMessage)
            .where(*filters)
            .order_by(OutboxMessage.id.desc())
            .offset((page - 1) * PAGE_SIZE)
            .limit(PAGE_SIZE)
        )
    ).scalars()
    return await render_template(
        "admin/outbox.html",
        rows=list(rows),
        status=status,
        statuses=STATUSES,
        page=page,
        pages=pages,
        total=total,
        form=EmptyForm(),
    )


@bp.post(f"/outbox/<int(min=1, max={MAX_ID}):message_id>/retry")
async def retry(message_id: int) -> ResponseReturnValue:
    form = await EmptyForm.from_request()
    if not form.validate():
        abort(
            400,
            "The form was missing its security token or it had expired. Reload "
            "the outbox page and press Retry again.",
        )
    back = url_for(
        "admin.outbox", status=_status_filter((await request.form).get("status"))
    )

    session = get_session()
    try:
        await retry_message(session=session, message_id=message_id)
    except OutboxMessageNotFound:
        abort(404, f"Outbox message {message_id} does not exist.")
    except OutboxMessageNotFailed as error:
        await flash(str(error), "error")
        return redirect(back)
    await session.commit()
    await flash(f"Outbox message {message_id} is being sent again.", "info")
    return redirect(back)


def _status_filter(value: str | None) -> str | None:
    """Return the status to filter by, None for all, or abort on an unknown one."""
    if not value:
        return None
    if value not in STATUSES:
        abort(
            400,
            f"Unknown outbox status {value!r}: choose one of {', '.join(STATUSES)}.",
        )
    return value
