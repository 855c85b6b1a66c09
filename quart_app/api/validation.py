"""Validation of JSON request bodies, with a precise error for each way they fail.

Quart-Schema's `validate_request` reads a body sent with another content type as
no body at all, and Quart raises a bare 400 on malformed JSON. `validate_json`
returns a distinct error for each case: 415 for the content type, 400 for JSON
that cannot be parsed, and 422 (from the schema) for the fields.
"""

from collections.abc import Awaitable, Callable
from functools import wraps
from typing import Any, TypeVar, cast

from pydantic import BaseModel
from quart import request
from quart_schema import validate_request
from werkzeug.exceptions import BadRequest

from quart_app.api.errors import UNSUPPORTED_MEDIA_TYPE_DETAIL, ApiError

View = TypeVar("View", bound=Callable[..., Awaitable[Any]])


def validate_json(model_class: type[BaseModel]) -> Callable[[View], View]:
    """Validate the JSON body against `model_class` and pass it as `data`."""

    def decorator(view: View) -> View:
        validated = validate_request(model_class)(view)

        @wraps(validated)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            await _load_json_object()
            return await validated(*args, **kwargs)

        return cast(View, wrapper)

    return decorator


async def _load_json_object() -> None:
    # The parsed body is cached on the request, where validate_request finds it.
    if not request.is_json:
        raise ApiError(415, "unsupported_media_type", UNSUPPORTED_MEDIA_TYPE_DETAIL)
    try:
        body = await request.get_json()
    # Python's JSON parser raises RecursionError on deeply nested arrays and
    # objects, and those fit easily within the body size limit.
    except (BadRequest, UnicodeDecodeError, RecursionError):
        raise ApiError(
            400, "invalid_json", "The request body is not valid UTF-8 JSON."
        ) from None
    if not isinstance(body, dict):
        raise ApiError(
            422, "validation_failed", "The request body must be a JSON object."
        )
