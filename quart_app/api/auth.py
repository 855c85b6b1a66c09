"""Authentication of API requests: HTTP Basic to get a token, Bearer for the rest.

Credentials come from the Authorization header only. The login cookie of the
HTML pages never authenticates an API request, so a cross-site page cannot make
a browser act through the API, and the API needs no CSRF token.

An unconfirmed user may get a token, read /api/users/me and ask for a new
confirmation email, but only a confirmed administrator may use the outbox
routes: anyone can sign up with the APP_ADMIN address, and only the confirmation
link proves they own it.
"""

import base64
import binascii
from collections.abc import Awaitable, Callable
from functools import wraps
from typing import Any, TypeVar, cast

from quart import g, request
from quart_schema import security_scheme

from quart_app.api.errors import ApiError
from quart_app.api.tokens import load_token_user
from quart_app.db import get_session
from quart_app.errors import TokenExpired, TokenInvalid
from quart_app.models import Role, User

View = TypeVar("View", bound=Callable[..., Awaitable[Any]])

REALM = "api"
BEARER_SCHEME = "bearer"
BASIC_SCHEME = "basic"


def token_required(*, administrator: bool = False) -> Callable[[View], View]:
    """Require a valid bearer token before the view runs.

    The view reads the user with `api_user()`. A missing or invalid token gets a
    401 with a WWW-Authenticate challenge. With `administrator`, a user who is
    not a confirmed administrator gets a 403. The check runs before the request
    body or query string is validated, so an anonymous caller learns nothing
    about a route's input.
    """

    def decorator(view: View) -> View:
        @wraps(view)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            user = await _authenticate_bearer()
            if administrator:
                _check_administrator(user)
            g.api_user = user
            return await view(*args, **kwargs)

        return cast(View, security_scheme([{BEARER_SCHEME: []}])(wrapper))

    return decorator


def api_user() -> User:
    """Return the user that the request's bearer token authenticated."""
    user: User = g.api_user
    return user


def basic_credentials() -> tuple[str, str]:
    """Return the email address and password of the request's Basic credentials.

    Raises:
        ApiError: 401 with a Basic challenge, when the header is missing, uses
            another scheme, or is not the base64 of UTF-8 "email:password".
    """
    header = request.headers.get("Authorization", "")
    scheme, _, encoded = header.strip().partition(" ")
    if scheme.lower() != BASIC_SCHEME:
        raise basic_challenge(
            "unauthorized",
            "Send your email address and password with HTTP Basic authentication.",
        )
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode()
    # b64decode raises a plain ValueError for a str with non-ASCII characters.
    except (binascii.Error, UnicodeDecodeError, ValueError):
        decoded = ""
    email, colon, password = decoded.partition(":")
    if not colon:
        raise basic_challenge(
            "unauthorized",
            "The Authorization header is not valid HTTP Basic credentials: send "
            "'Basic ' followed by the base64 of the UTF-8 text email:password.",
        )
    return email, password


def basic_challenge(error: str, detail: str) -> ApiError:
    return ApiError(
        401,
        error,
        detail,
        headers={"WWW-Authenticate": f'Basic realm="{REALM}", charset="UTF-8"'},
    )


async def _authenticate_bearer() -> User:
    credentials = request.authorization
    token = credentials.token if credentials is not None else None
    if credentials is None or credentials.type != BEARER_SCHEME or not token:
        raise ApiError(
            401,
            "unauthorized",
            "Send a bearer token in the Authorization header: get one from "
            "POST /api/tokens.",
            headers={"WWW-Authenticate": f'Bearer realm="{REALM}"'},
        )
    try:
        return await load_token_user(session=get_session(), token=token)
    except TokenExpired as error:
        raise _invalid_token("token_expired", str(error)) from None
    except TokenInvalid as error:
        raise _invalid_token("invalid_token", str(error)) from None


def _invalid_token(error: str, detail: str) -> ApiError:
    # RFC 6750 uses the code invalid_token for expired tokens too.
    return ApiError(
        401,
        error,
        f"{detail} Get a new one from POST /api/tokens.",
        headers={"WWW-Authenticate": f'Bearer realm="{REALM}", error="invalid_token"'},
    )


def _check_administrator(user: User) -> None:
    if user.is_administrator:
        return
    if user.role != Role.ADMINISTRATOR.value:
        raise ApiError(403, "forbidden", "Only an administrator may use this route.")
    # The role counts only once the address is confirmed.
    raise ApiError(
        403,
        "unconfirmed",
        "Confirm your email address before using this route: POST "
        "/api/users/me/confirmation sends a new link.",
    )
