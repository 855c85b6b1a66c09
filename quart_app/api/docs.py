"""The OpenAPI description of the JSON API.

/openapi.json is built by Quart-Schema from the routes under /api (and
/healthz).
"""

from collections.abc import Iterable
from typing import cast

from quart import Blueprint, Quart, current_app
from quart.typing import ResponseReturnValue
from quart_schema import (
    Info,
    OpenAPIProvider,
    PydanticDumpOptions,
    QuartSchema,
    Tag,
)
from werkzeug.routing import Rule

from quart_app.api.auth import BASIC_SCHEME, BEARER_SCHEME
from quart_app.api.errors import API_PREFIX

bp = Blueprint("docs", __name__)

TAGS: list[Tag | dict[str, str]] = [
    Tag(name="users", description="Sign up, confirm the address, read the account."),
    Tag(name="tokens", description="Bearer tokens for the other routes."),
    Tag(name="password resets", description="Reset a forgotten password by email."),
    Tag(name="outbox", description="The email outbox (administrators only)."),
    Tag(name="health", description="Whether the service and its database respond."),
]
DESCRIPTION = (
    "Get a bearer token from `POST /api/tokens` with HTTP Basic authentication "
    "(email address and password), then send it as `Authorization: Bearer "
    '<token>`. Every error is JSON: `{"error": <code>, "detail": '
    "<sentence>}`."
)


class ApiOpenAPIProvider(OpenAPIProvider):
    """Describe only the JSON API, leaving out the HTML pages."""

    def generate_rules(self) -> Iterable[Rule]:
        for rule in super().generate_rules():
            if (
                rule.rule.startswith(API_PREFIX + "/")
                or rule.endpoint == "main.healthz"
            ):
                yield rule


def init_app(app: Quart) -> None:
    """Set up Quart-Schema, with the routes of this module serving the docs."""
    QuartSchema(
        app,
        openapi_path=None,
        redoc_ui_path=None,
        scalar_ui_path=None,
        swagger_ui_path=None,
        info=Info(title="Quart App API", version="1.0", description=DESCRIPTION),
        tags=TAGS,
        security_schemes={
            BEARER_SCHEME: {"type": "http", "scheme": "bearer"},
            BASIC_SCHEME: {"type": "http", "scheme": "basic"},
        },
        # JSON mode writes datetimes in ISO 8601, where Quart's own JSON
        # encoder would write them as HTTP dates. Quart-Schema 0.25 passes these
        # options to model_dump unchanged, but its TypedDict lacks `mode`.
        pydantic_dump_options=cast(PydanticDumpOptions, {"mode": "json"}),
        openapi_provider_class=ApiOpenAPIProvider,
    )


@bp.get("/openapi.json")
async def openapi() -> ResponseReturnValue:
    extension: QuartSchema = current_app.extensions["QUART_SCHEMA"]
    return extension.openapi_provider.schema()
