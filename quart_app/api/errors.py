"""Errors of the JSON API, returned as ``{"error": <code>, "detail": <sentence>}``.

`error` is a short, stable code for programs to branch on, and `detail` is a
sentence for the person reading it, naming what failed and what to do next.
Every error under /api takes this shape, including those that no API route
raised: an unknown path, a method the route lacks, or a body over
MAX_CONTENT_LENGTH.
"""

from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError
from quart import Response, current_app, jsonify, request
from quart_schema import RequestSchemaValidationError
from quart_schema.validation import QuerystringValidationError
from werkzeug.exceptions import (
    HTTPException,
    MethodNotAllowed,
    NotFound,
    RequestEntityTooLarge,
    UnsupportedMediaType,
)

API_PREFIX = "/api"
UNSUPPORTED_MEDIA_TYPE_DETAIL = (
    "Send the body as JSON, with the header Content-Type: application/json."
)


class ApiError(HTTPException):
    """An HTTP error with a short code, raised by the API's views.

    It subclasses werkzeug's HTTPException, so Quart handles it like `abort`.
    """

    def __init__(
        self,
        status: int,
        error: str,
        detail: str,
        *,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(description=detail)
        self.code = status
        self.error = error
        self.headers = dict(headers or {})


def is_api_request() -> bool:
    """Check whether the current request is for the JSON API."""
    path = request.path
    return path == API_PREFIX or path.startswith(API_PREFIX + "/")


def error_response(error: HTTPException) -> Response:
    """Build the JSON response for an HTTP error raised during an API request."""
    code, detail = _describe(error)
    response = jsonify(error=code, detail=detail)
    response.status_code = error.code or 500
    # werkzeug adds headers such as Allow (405) and WWW-Authenticate (401) here.
    for name, value in error.get_headers():
        if name.lower() != "content-type":
            response.headers[name] = value
    if isinstance(error, ApiError):
        response.headers.update(error.headers)
    return response


def server_error_response() -> Response:
    response = jsonify(
        error="internal_server_error",
        detail="The server failed to handle the request. The error has been "
        "logged: try again later.",
    )
    response.status_code = 500
    return response


def validation_error_response(error: RequestSchemaValidationError) -> Response:
    """Build a 422 for a body that fails its schema, or a 400 for a bad query."""
    problems = _list_problems(error.validation_error)
    if isinstance(error, QuerystringValidationError):
        api_error = ApiError(400, "invalid_query", f"Invalid query string: {problems}")
    else:
        api_error = ApiError(
            422, "validation_failed", f"Invalid request body: {problems}"
        )
    return error_response(api_error)


def _describe(error: HTTPException) -> tuple[str, str]:
    if isinstance(error, ApiError):
        return error.error, error.description or ""
    if isinstance(error, NotFound):
        return (
            "not_found",
            f"No API route matches {request.path}. The routes, and the range "
            "of each id in a path, are listed at /openapi.json.",
        )
    if isinstance(error, MethodNotAllowed):
        allowed = sorted(set(error.valid_methods or ()) - {"HEAD", "OPTIONS"})
        return (
            "method_not_allowed",
            f"{request.method} is not allowed on {request.path}: use "
            f"{' or '.join(allowed)}.",
        )
    if isinstance(error, RequestEntityTooLarge):
        limit = current_app.config["MAX_CONTENT_LENGTH"]
        return (
            "payload_too_large",
            f"The request body is larger than the limit of {limit} bytes.",
        )
    if isinstance(error, UnsupportedMediaType):
        return "unsupported_media_type", UNSUPPORTED_MEDIA_TYPE_DETAIL
    code = error.name.lower().replace(" ", "_").replace("'", "")
    return code, error.description or error.name


def _list_problems(validation_error: Any) -> str:
    """List each invalid field with its problem, never with the value sent."""
    if not isinstance(validation_error, ValidationError):
        return str(validation_error)
    problems = []
    for item in validation_error.errors(include_input=False, include_url=False):
        message = item["msg"].removeprefix("Value error, ")
        location = ".".join(str(part) for part in item["loc"])
        problems.append(f"{location}: {message}" if location else message)
    text = "; ".join(problems)
    return text if text.endswith(".") else text + "."
