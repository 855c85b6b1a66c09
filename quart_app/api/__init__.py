"""The JSON API under /api, and its OpenAPI docs at /openapi.json and /docs."""

from quart_app.api.docs import bp as docs_bp, init_app
from quart_app.api.errors import error_response, is_api_request, server_error_response
from quart_app.api.routes import bp

__all__ = (
    "bp",
    "docs_bp",
    "error_response",
    "init_app",
    "is_api_request",
    "server_error_response",
)
