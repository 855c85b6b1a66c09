"""The routes of the JSON API under /api."""

from quart import Blueprint, url_for
from quart.typing import ResponseReturnValue
from quart_schema import (
    RequestSchemaValidationError,
    document_response,
    security_scheme,
    tag,
    validate_querystring,
    validate_response,
)
from sqlalchemy import select

from quart_app.api.auth import (
    BASIC_SCHEME,
    api_user,
    basic_challenge,
    basic_credentials,
    token_required,
)
from quart_app.api.errors import ApiError, validation_error_response
from quart_app.api.schemas import (
    MAX_ID,
    ApiResponse,
    ErrorResponse,
    OutboxMessageResponse,
    OutboxPage,
    OutboxQuery,
    TokenResponse,
    UserResponse,
)
from quart_app.api.tokens import issue_token
from quart_app.auth.forms import PASSWORD_MAX_LENGTH
from quart_app.db import get_session
from quart_app.errors import OutboxMessageNotFailed, OutboxMessageNotFound
from quart_app.models import EMAIL_MAX_LENGTH, OutboxMessage, find_user_by_email
from quart_app.outbox import retry_message
from quart_app.passwords import verify_password

bp = Blueprint("api", __name__, url_prefix="/api")

# Sent with responses that carry a token, so no cache keeps it.
NO_STORE = {"Cache-Control": "no-store"}


@bp.errorhandler(RequestSchemaValidationError)
async def _invalid_request(error: RequestSchemaValidationError) -> ResponseReturnValue:
    return validation_error_response(error)


@bp.post("/tokens")
@tag(["tokens"])
@security_scheme([{BASIC_SCHEME: []}])
@validate_response(TokenResponse)
@document_response(ErrorResponse, 401)
async def create_token() -> ApiResponse:
    """Get a bearer token with your email address and password.

    Send them with HTTP Basic authentication. The token authenticates the other
    routes until `expires_at`, or until the password changes. Unconfirmed users
    get a token too, so they can read their account and ask for a new
    confirmation email.
    """
    email, password = basic_credentials()
    user = None
    # Over-long values cannot match, so they are not hashed at all.
    if len(email) <= EMAIL_MAX_LENGTH and len(password) <= PASSWORD_MAX_LENGTH:
        user = await find_user_by_email(session=get_session(), email=email)
        # The password is checked even with no such user, against a dummy hash,
        # so the response time does not reveal which addresses are registered.
        matched = await verify_password(user.password_hash if user else None, password)
        user = user if matched else None
    if user is None:
        raise basic_challenge(
            "invalid_credentials", "Invalid email address or password."
        )

    issued = issue_token(user)
    response = TokenResponse(token=issued.token, expires_at=issued.expires_at)
    return response, 200, NO_STORE


@bp.get("/users/me")
@tag(["users"])
@token_required()
@validate_response(UserResponse)
@document_response(ErrorResponse, 401)
async def get_current_user() -> ApiResponse:
    """Read the account that the bearer token belongs to."""
    return UserResponse.from_user(api_user())


@bp.get("/outbox")
@tag(["outbox"])
@token_required(administrator=True)
@validate_querystring(OutboxQuery)
@validate_response(OutboxPage)
@document_response(ErrorResponse, 400)
@document_response(ErrorResponse, 401)
@document_response(ErrorResponse, 403)
async def list_outbox(query_args: OutboxQuery) -> ApiResponse:
    """List outbox messages, newest first (administrators only).

    At most `limit` messages come back. When there are more, the Link header
    carries the URL of the next page (rel="next"), which passes the smallest id
    listed as `before`.
    """
    statement = select(OutboxMessage).order_by(OutboxMessage.id.desc())
    if query_args.status is not None:
        statement = statement.where(OutboxMessage.status == query_args.status.value)
    if query_args.before is not None:
        statement = statement.where(OutboxMessage.id < query_args.before)
    # One row more than the page shows whether a next page exists.
    result = await get_session().execute(statement.limit(query_args.limit + 1))
    rows = list(result.scalars())

    page = rows[: query_args.limit]
    headers = {}
    if len(rows) > query_args.limit:
        next_url = url_for(
            "api.list_outbox",
            status=query_args.status.value if query_args.status else None,
            limit=query_args.limit,
            before=page[-1].id,
        )
        headers["Link"] = f'<{next_url}>; rel="next"'
    messages = [OutboxMessageResponse.from_row(row) for row in page]
    return OutboxPage(messages), 200, headers


@bp.post(f"/outbox/<int(min=1, max={MAX_ID}):message_id>/retry")
@tag(["outbox"])
@token_required(administrator=True)
@validate_response(OutboxMessageResponse, 202)
@document_response(ErrorResponse, 401)
@document_response(ErrorResponse, 403)
@document_response(ErrorResponse, 404)
@document_response(ErrorResponse, 409)
async def retry_outbox_message(message_id: int) -> ApiResponse:
    """Send a failed message again (administrators only).

    The message goes back to pending with no attempts counted, and is sent right
    away. Only a failed message can be retried: any other status gets a 409.
    """
    session = get_session()
    try:
        row = await retry_message(session=session, message_id=message_id)
    except OutboxMessageNotFound as error:
        raise ApiError(404, "not_found", str(error)) from None
    except OutboxMessageNotFailed as error:
        raise ApiError(409, "not_failed", str(error)) from None
    await session.commit()
    return OutboxMessageResponse.from_row(row), 202
