"""The OpenAPI description of the JSON API, and Swagger UI to read it.

/openapi.json is built by Quart-Schema from the routes under /api (and
/healthz). /docs shows it in Swagger UI, whose files come from the
swagger-ui-py package and are served by this app, so the docs work offline and
under the app's Content-Security-Policy, which allows scripts from this origin
only.
"""

from collections.abc import Callable, Iterable
from importlib.resources import files
from typing import Any, TypeVar, cast

from quart import Blueprint, Quart, current_app, render_template
from quart.typing import ResponseReturnValue
from quart_schema import (
    Info,
    OpenAPIProvider,
    PydanticDumpOptions,
    QuartSchema,
    Tag,
)
from werkzeug.routing import BaseConverter, Rule
from werkzeug.routing.converters import NumberConverter

from quart_app.api.auth import BASIC_SCHEME, BEARER_SCHEME
from quart_app.api.errors import API_PREFIX
from quart_app.api.schemas import ErrorResponse

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


# View attributes read by ApiOpenAPIProvider, set by the decorators below.
_EXTRA_RESPONSES = "api_docs_extra_responses"
_RESPONSE_HEADERS = "api_docs_response_headers"

View = TypeVar("View", bound=Callable[..., Any])


def document_no_content(status_code: int, description: str) -> Callable[[View], View]:
    """Document a response of `status_code` that has no body."""

    def decorator(view: View) -> View:
        responses = getattr(view, _EXTRA_RESPONSES, {})
        responses[status_code] = description
        setattr(view, _EXTRA_RESPONSES, responses)
        return view

    return decorator


def document_header(
    status_code: int, name: str, description: str
) -> Callable[[View], View]:
    """Document a header of the `status_code` response, such as Link."""

    def decorator(view: View) -> View:
        headers = getattr(view, _RESPONSE_HEADERS, {})
        headers.setdefault(status_code, {})[name] = description
        setattr(view, _RESPONSE_HEADERS, headers)
        return view

    return decorator


class ApiOpenAPIProvider(OpenAPIProvider):
    """Describe only the JSON API, leaving out the HTML pages.

    It adds what Quart-Schema 0.25 leaves out: responses without a body, response
    headers, the 413 and 415 errors of every route that takes a JSON body, and
    the bounds of integer path parameters.
    """

    def generate_rules(self) -> Iterable[Rule]:
        for rule in super().generate_rules():
            if (
                rule.rule.startswith(API_PREFIX + "/")
                or rule.endpoint == "main.healthz"
            ):
                yield rule

    def build_paths(self, rule: Rule) -> tuple[dict[str, Any], dict[str, Any]]:
        paths, components = super().build_paths(rule)
        view = self._app.view_functions[rule.endpoint]
        extra = getattr(view, _EXTRA_RESPONSES, {})
        headers = getattr(view, _RESPONSE_HEADERS, {})
        for operations in paths.values():
            for operation in operations.values():
                responses = operation["responses"]
                for status_code, description in extra.items():
                    responses[status_code] = {"description": description}
                if "requestBody" in operation:
                    for status_code, description in _BODY_ERRORS.items():
                        if status_code not in responses:
                            error, _ = self.build_response_object(ErrorResponse, None)
                            responses[status_code] = {
                                **error,
                                "description": description,
                            }
                for status_code, named in headers.items():
                    responses[status_code]["headers"] = {
                        name: {"description": text, "schema": {"type": "string"}}
                        for name, text in named.items()
                    }
        return paths, components

    def build_path_parameter(
        self, name: str, converter: BaseConverter
    ) -> dict[str, Any]:
        parameter = super().build_path_parameter(name, converter)
        if isinstance(converter, NumberConverter):
            if converter.min is not None:
                parameter["schema"]["minimum"] = converter.min
            if converter.max is not None:
                parameter["schema"]["maximum"] = converter.max
        return parameter


_BODY_ERRORS = {
    413: "The body is larger than 1 MiB.",
    415: "The body is not application/json.",
}


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
