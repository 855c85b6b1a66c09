"""The OpenAPI description of the JSON API, and Swagger UI to read it.

/openapi.json is built by Quart-Schema from the routes under /api (and
/healthz). /docs shows it in Swagger UI, whose files come from the
swagger-ui-py package and are served by this app, so the docs work offline and
under the app's Content-Security-Policy, which allows scripts from this origin
only.
"""

from collections.abc import Iterable
from importlib.resources import files
from typing import cast

from quart import Blueprint, Quart, current_app, render_template
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

SWAGGER_UI_FOLDER = str(files("swagger_ui") / "static")

bp = Blueprint(
    "docs",
    __name__,
    static_folder=SWAGGER_UI_FOLDER,
    static_url_path="/docs/assets",
)

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


@bp.get("/docs")
async def docs() -> ResponseReturnValue:
    return await render_template("api/docs.html")
