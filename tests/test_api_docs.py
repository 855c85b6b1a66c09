"""The OpenAPI description at /openapi.json and Swagger UI at /docs."""

import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from openapi_spec_validator import validate
from playwright.async_api import ConsoleMessage, Page, async_playwright, expect
from quart.testing import QuartClient

from tests.live import live_server, migrated_instance
from tests.test_browser import CHROMIUM, CHROMIUM_ARGS

API_OPERATIONS = {
    ("post", "/api/users"),
    ("post", "/api/tokens"),
    ("get", "/api/users/me"),
    ("post", "/api/users/me/confirmation"),
    ("post", "/api/confirmations"),
    ("post", "/api/password-resets"),
    ("post", "/api/password-resets/{token}"),
    ("get", "/api/outbox"),
    ("post", "/api/outbox/{message_id}/retry"),
    ("get", "/healthz"),
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

    operations = {
        (method, path) for path, methods in spec["paths"].items() for method in methods
    }
    assert operations == API_OPERATIONS


async def test_openapi_declares_security(client: QuartClient) -> None:
    spec = await _spec(client)
    paths = spec["paths"]

    assert spec["components"]["securitySchemes"] == {
        "bearer": {"type": "http", "scheme": "bearer"},
        "basic": {"type": "http", "scheme": "basic"},
    }
    assert paths["/api/tokens"]["post"]["security"] == [{"basic": []}]
    assert paths["/api/users/me"]["get"]["security"] == [{"bearer": []}]
    assert paths["/api/users/me/confirmation"]["post"]["security"] == [{"bearer": []}]
    assert "security" not in paths["/api/users"]["post"]
    assert "security" not in paths["/api/password-resets"]["post"]
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


async def test_docs_page_served(client: QuartClient) -> None:
    response = await client.get("/docs")
    page = await response.get_data(as_text=True)

    assert response.status_code == 200
    assert 'id="swagger-ui"' in page
    assert 'data-spec-url="/openapi.json"' in page
    assert '<script src="/docs/assets/swagger-ui-bundle.js"></script>' in page


@pytest.mark.parametrize(
    ("path", "mimetype"),
    [
        ("/docs/assets/swagger-ui-bundle.js", "text/javascript"),
        ("/docs/assets/swagger-ui.css", "text/css"),
        ("/static/docs.js", "text/javascript"),
    ],
)
async def test_docs_assets_served(
    client: QuartClient, path: str, mimetype: str
) -> None:
    response = await client.get(path)

    assert response.status_code == 200
    assert response.mimetype == mimetype


@pytest.fixture(name="browser_page")
async def _browser_page() -> AsyncIterator[Page]:
    if not CHROMIUM.exists():
        if os.environ.get("CI"):
            pytest.fail(f"Chromium not found at {CHROMIUM}, and CI is set")
        pytest.skip(f"Chromium not found at {CHROMIUM}")
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield await browser.new_page()
        finally:
            await browser.close()


@pytest.mark.browser
async def test_docs_render_in_browser(browser_page: Page, tmp_path: Path) -> None:
    problems: list[str] = []

    def record_console(message: ConsoleMessage) -> None:
        # A script blocked by the Content-Security-Policy is reported here.
        if message.type == "error":
            problems.append(message.text)

    browser_page.on("console", record_console)
    browser_page.on("pageerror", lambda error: problems.append(str(error)))

    async with live_server(migrated_instance(tmp_path)) as server:
        await browser_page.goto(f"{server.base_url}/docs")
        title = browser_page.get_by_role("heading", name="Quart App API")
        await expect(title).to_be_visible()
        retry_path = browser_page.get_by_text(
            "/api/outbox/{message_id}/retry", exact=True
        )
        await expect(retry_path).to_be_visible()
        authorize = browser_page.get_by_role("button", name="Authorize")
        await expect(authorize).to_be_visible()

    assert problems == []


async def test_openapi_documents_no_body_success(client: QuartClient) -> None:
    spec = await _spec(client)
    reset = spec["paths"]["/api/password-resets/{token}"]["post"]["responses"]

    assert reset["204"] == {"description": "The password was changed."}


async def test_openapi_body_routes_list_413_415(client: QuartClient) -> None:
    spec = await _spec(client)
    with_body = [
        (path, method, operation)
        for path, operations in spec["paths"].items()
        for method, operation in operations.items()
        if "requestBody" in operation
    ]

    assert len(with_body) == 4
    for path, method, operation in with_body:
        for status in ("413", "415"):
            response = operation["responses"].get(status)
            assert response is not None, f"{method} {path} lacks {status}"
            schema = response["content"]["application/json"]["schema"]
            assert set(schema["required"]) == {"error", "detail"}


async def test_openapi_documents_link_and_bounds(client: QuartClient) -> None:
    spec = await _spec(client)
    listing = spec["paths"]["/api/outbox"]["get"]["responses"]["200"]
    [parameter] = spec["paths"]["/api/outbox/{message_id}/retry"]["post"]["parameters"]

    assert "Link" in listing["headers"]
    assert parameter["schema"]["minimum"] == 1
    assert parameter["schema"]["maximum"] == 2**31 - 1
