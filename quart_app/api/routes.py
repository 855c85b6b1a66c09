"""The routes of the JSON API under /api."""

import math

from quart import Blueprint, current_app, url_for
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

from quart_app import accounts
from quart_app.accounts import PASSWORD_MAX_LENGTH
from quart_app.api.auth import (
    BASIC_SCHEME,
    api_user,
    basic_challenge,
    basic_credentials,
    token_required,
)
from quart_app.api.docs import document_header, document_no_content
from quart_app.api.errors import ApiError, validation_error_response
from quart_app.api.schemas import (
    AcceptedResponse,
    ApiResponse,
    ConfirmationRequest,
    ErrorResponse,
    NewPasswordRequest,
    OutboxMessageResponse,
    OutboxPage,
    OutboxQuery,
    PasswordResetRequest,
    SignupRequest,
    TokenResponse,
    UserResponse,
)
from quart_app.api.tokens import issue_token
from quart_app.api.validation import validate_json
from quart_app.db import get_session
from quart_app.errors import (
    DuplicateUser,
    LoginThrottled,
    OutboxMessageNotFailed,
    OutboxMessageNotFound,
    TokenExpired,
    TokenInvalid,
)
from quart_app.models import EMAIL_MAX_LENGTH, MAX_ID, OutboxMessage, User, utcnow
from quart_app.outbox import retry_message

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
@document_response(ErrorResponse, 429)
async def create_token() -> ApiResponse:
    """Get a bearer token with your email address and password.

    Send them with HTTP Basic authentication. The token authenticates the other
    routes until `expires_at`, or until the password changes. Unconfirmed users
    get a token too, so they can read their account and ask for a new
    confirmation email. After too many failed attempts the route returns 429,
    with Retry-After, until its lockout ends or the password is reset.
    """
    email, password = basic_credentials()
    session = get_session()
    user = None
    # Over-long values cannot match, so they are not hashed at all.
    if len(email) <= EMAIL_MAX_LENGTH and len(password) <= PASSWORD_MAX_LENGTH:
        try:
            user = await accounts.authenticate(
                session=session, email=email, password=password
            )
        except LoginThrottled as error:
            raise ApiError(
                429,
                "too_many_failed_logins",
                str(error),
                headers={"Retry-After": str(error.retry_after)},
            ) from None
    if user is None:
        raise basic_challenge(
            "invalid_credentials", "Invalid email address or password."
        )

    # Saves the new hash when `authenticate` rehashed the password, before the
    # token takes the fingerprint of that hash.
    await session.commit()
    issued = issue_token(user)
    response = TokenResponse(token=issued.token, expires_at=issued.expires_at)
    return response, 200, NO_STORE


@bp.post("/users")
@tag(["users"])
@validate_json(SignupRequest)
@validate_response(UserResponse, 201)
@document_response(ErrorResponse, 400)
@document_response(ErrorResponse, 409)
@document_response(ErrorResponse, 415)
@document_response(ErrorResponse, 422)
async def create_user(data: SignupRequest) -> ApiResponse:
    """Sign up: create an unconfirmed account and email it a confirmation link.

    The address and username must be new, compared without regard to case: a
    clash gets a 409 whose error is duplicate_email or duplicate_username.
    """
    session = get_session()
    try:
        user = await accounts.register_user(
            session=session,
            email=data.email,
            username=data.username,
            password=data.password,
        )
    except DuplicateUser as error:
        detail = _DUPLICATE_DETAILS[error.field]
        raise ApiError(409, f"duplicate_{error.field}", detail) from None
    await session.commit()
    return UserResponse.from_user(user), 201


@bp.get("/users/me")
@tag(["users"])
@token_required()
@validate_response(UserResponse)
@document_response(ErrorResponse, 401)
async def get_current_user() -> ApiResponse:
    """Read the account that the bearer token belongs to."""
    return UserResponse.from_user(api_user())


@bp.post("/users/me/confirmation")
@tag(["users"])
@token_required()
@validate_response(AcceptedResponse, 202)
@document_response(ErrorResponse, 401)
@document_response(ErrorResponse, 409)
@document_response(ErrorResponse, 429)
async def resend_confirmation() -> ApiResponse:
    """Email a new confirmation link to the token's unconfirmed account.

    A confirmed account gets a 409. One link may be asked for every
    CONFIRMATION_RESEND_INTERVAL seconds (60 by default). Sooner gets a 429,
    whose Retry-After header gives the seconds left.
    """
    user = api_user()
    if user.confirmed:
        raise ApiError(
            409,
            "already_confirmed",
            "The account is confirmed already, so no new link is needed.",
        )

    session = get_session()
    if not await accounts.resend_confirmation(session=session, user=user):
        await session.rollback()
        seconds_left = await _seconds_until_resend(user)
        raise ApiError(
            429,
            "rate_limited",
            f"A confirmation email was sent moments ago: check your inbox, or try "
            f"again in {seconds_left} seconds.",
            headers={"Retry-After": str(seconds_left)},
        )
    await session.commit()
    return AcceptedResponse(
        detail=f"A new confirmation link is on its way to {user.email}."
    ), 202


@bp.post("/confirmations")
@tag(["users"])
@validate_json(ConfirmationRequest)
@validate_response(UserResponse)
@document_response(ErrorResponse, 400)
@document_response(ErrorResponse, 422)
async def confirm_account(data: ConfirmationRequest) -> ApiResponse:
    """Confirm an account with the token from its confirmation email.

    The token is the last part of the link's path. Confirming twice is not an
    error: the second time the account is returned unchanged.
    """
    session = get_session()
    try:
        user, _ = await accounts.confirm_account(session=session, token=data.token)
    except TokenExpired:
        raise ApiError(
            400,
            "token_expired",
            "The confirmation link has expired: log in and ask for a new one with "
            "POST /api/users/me/confirmation.",
        ) from None
    except TokenInvalid:
        raise ApiError(
            400, "invalid_token", "The confirmation token is invalid."
        ) from None
    await session.commit()
    return UserResponse.from_user(user)


@bp.post("/password-resets")
@tag(["password resets"])
@validate_json(PasswordResetRequest)
@validate_response(AcceptedResponse, 202)
@document_response(ErrorResponse, 400)
@document_response(ErrorResponse, 415)
@document_response(ErrorResponse, 422)
async def create_password_reset(data: PasswordResetRequest) -> ApiResponse:
    """Email a link to reset the password, if an account uses the address.

    The status and body are the same whether or not the address is registered,
    so they do not reveal which addresses have accounts. One email per account
    is sent every PASSWORD_RESET_INTERVAL seconds (60 by default) at most.
    """
    session = get_session()
    # NOTE: a registered address takes longer to respond to, because its email is
    # rendered and queued here, so response times can still hint at accounts.
    await accounts.request_password_reset(session=session, email=data.email)
    await session.commit()
    detail = (
        "If an account uses that address, an email with a link to reset its "
        "password is on its way to it."
    )
    return AcceptedResponse(detail=detail), 202


@bp.post("/password-resets/<token>")
@tag(["password resets"])
@validate_json(NewPasswordRequest)
@document_no_content(204, "The password was changed.")
@document_response(ErrorResponse, 400)
@document_response(ErrorResponse, 415)
@document_response(ErrorResponse, 422)
async def complete_password_reset(
    token: str, data: NewPasswordRequest
) -> ResponseReturnValue:
    """Set a new password with the token from a password reset email.

    The token is the last part of the link's path, and works once. The new
    password revokes every bearer token and login of the account, and confirms
    the account, since the email proved control of its address. Success
    returns 204 with no body.
    """
    session = get_session()
    try:
        await accounts.reset_password(
            session=session, token=token, password=data.password
        )
    except TokenExpired:
        raise ApiError(
            400,
            "token_expired",
            "The password reset link has expired: ask for a new one with POST "
            "/api/password-resets.",
        ) from None
    except TokenInvalid:
        raise ApiError(
            400,
            "invalid_token",
            "The password reset token is invalid, was used already, or is "
            "outdated by a later change of password or address.",
        ) from None
    await session.commit()
    return "", 204


@bp.get("/outbox")
@tag(["outbox"])
@token_required(administrator=True)
@validate_querystring(OutboxQuery)
@validate_response(OutboxPage)
@document_header(200, "Link", 'The next page, as <URL>; rel="next", if there is one.')
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


_DUPLICATE_DETAILS = {
    "email": "An account with that email address exists already: log in, or "
    "reset its password.",
    "username": "That username is taken: choose another one.",
}


async def _seconds_until_resend(user: User) -> int:
    """Return the whole seconds until `user` may ask for another confirmation."""
    await get_session().refresh(user)
    interval: int = current_app.config["CONFIRMATION_RESEND_INTERVAL"]
    if user.confirmation_sent_at is None:
        return 1
    elapsed = (utcnow() - user.confirmation_sent_at).total_seconds()
    return max(1, math.ceil(interval - elapsed))
