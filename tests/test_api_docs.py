"""The OpenAPI description at /openapi.json."""

from typing import Any

from openapi_spec_validator import validate
from quart.testing import QuartClient

API_PATHS = {
    "/api/outbox",
    "/api/outbox/{message_id}/retry",
    "/api/tokens",
    "/api/users/me",
    "/healthz",
}


async def _spec(client: QuartClient) -> dict[str, Any]:
    response = await client.get("/openapi.json")
    assert response.status_code == 200
    assert response.mimetype == "application/json"
    spec: dict[str, Any] = await response.get_json()
    return spec


async def test_openapi_is_valid_document(client: QuartClient) -> None:
    spec = await _spec(client)

    validate(spec)
    assert spec["openapi"].startswith("3.1")
    assert spec["info"]["title"] == "Quart App API"


async def test_openapi_lists_api_routes(client: QuartClient) -> None:
    spec = await _spec(client)

    assert API_PATHS <= set(spec["paths"])
    assert all(path.startswith("/api/") or path == "/healthz" for path in spec["paths"])


async def test_openapi_declares_security(client: QuartClient) -> None:
    spec = await _spec(client)
    paths = spec["paths"]

    assert spec["components"]["securitySchemes"] == {
        "bearer": {"type": "http", "scheme": "bearer"},
        "basic": {"type": "http", "scheme": "basic"},
    }
    assert paths["/api/tokens"]["post"]["security"] == [{"basic": []}]
    assert paths["/api/users/me"]["get"]["security"] == [{"bearer": []}]
    assert paths["/api/outbox"]["get"]["security"] == [{"bearer": []}]
    assert paths["/api/outbox/{message_id}/retry"]["post"]["security"] == [
        {"bearer": []}
    ]


async def test_openapi_tags_every_operation(client: QuartClient) -> None:
    spec = await _spec(client)
    declared = {tag["name"] for tag in spec["tags"]}

    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            assert operation.get("tags"), f"{method} {path} has no tag"
            assert set(operation["tags"]) <= declared, f"{method} {path}"


async def test_openapi_documents_errors(client: QuartClient) -> None:
    spec = await _spec(client)
    retry = spec["paths"]["/api/outbox/{message_id}/retry"]["post"]

    assert {"202", "401", "403", "404", "409"} <= set(retry["responses"])
    error = retry["responses"]["409"]["content"]["application/json"]["schema"]
    assert set(error["required"]) == {"error", "detail"}
