import html
import re
from pathlib import Path

import pytest
from quart import Quart

from quart_app import create_app
from tests.conftest import page_text, register, serving


@pytest.fixture(name="dev_app")
def _dev_app(database_url: str, tmp_path: Path) -> Quart:
    return create_app(
        {
            "APP_ENV": "development",
            "DATABASE_URL": database_url,
            "INSTANCE_PATH": str(tmp_path / "instance"),
            "APP_BASE_URL": "http://127.0.0.1:8000",
        }
    )


async def _message_paths(client: object) -> list[str]:
    response = await client.get("/dev/mailbox")  # type: ignore[attr-defined]
    assert response.status_code == 200
    return re.findall(r'href="(/dev/mailbox/[0-9a-f-]+)"', await page_text(response))


async def test_mailbox_shows_signup_email(dev_app: Quart) -> None:
    async with serving(dev_app) as client:
        assert (await register(client)).status_code == 302

    # A new start of the app still lists the message: it is kept on disk.
    async with serving(dev_app) as client:
        listing = await client.get("/dev/mailbox")
        page = await page_text(listing)
        assert "[Quart App] Confirm Your Account" in page
        assert "alice@example.com" in page
        [path] = await _message_paths(client)

        detail = await client.get(path)
        assert detail.status_code == 200
        detail_page = await page_text(detail)

    text_part = re.search(r'<pre class="text-part">(.*?)</pre>', detail_page, re.S)
    assert text_part is not None
    link = re.search(
        r'<a href="(http://127\.0\.0\.1:8000/auth/confirm/[^"]+)"', text_part.group(1)
    )
    assert link is not None
    frame = re.search(
        r'<iframe class="html-part"[^>]*sandbox="([^"]*)" srcdoc="([^"]*)"', detail_page
    )
    assert frame is not None
    assert "allow-scripts" not in frame.group(1)
    assert "allow-same-origin" not in frame.group(1)
    srcdoc = html.unescape(frame.group(2))
    assert f'href="{link.group(1)}"' in srcdoc
    assert '<base target="_top">' in srcdoc
    assert "<th>X-Envelope-To</th><td>alice@example.com</td>" in detail_page
    assert "<th>Subject</th>" in detail_page


async def test_mailbox_lists_newest_first(dev_app: Quart) -> None:
    async with serving(dev_app) as client:
        await register(client)
        await client.get("/auth/logout")
        await register(client, email="bob@example.com", username="bob")
    async with serving(dev_app) as client:
        page = await page_text(await client.get("/dev/mailbox"))
    assert page.index("bob@example.com") < page.index("alice@example.com")


@pytest.mark.parametrize(
    "message_id",
    ["missing", "../secret_key", "..%2Fsecret_key", "0" * 20 + "-" + "0" * 32],
)
async def test_mailbox_unknown_id_404(dev_app: Quart, message_id: str) -> None:
    async with serving(dev_app) as client:
        response = await client.get(f"/dev/mailbox/{message_id}")
        assert response.status_code == 404


async def test_mailbox_absent_outside_development(
    database_url: str, tmp_path: Path
) -> None:
    app = create_app(
        {
            "APP_ENV": "testing",
            "DATABASE_URL": database_url,
            "INSTANCE_PATH": str(tmp_path),
            "MAIL_SERVER": "127.0.0.1",
        }
    )
    assert "dev_mailbox" not in app.extensions
    async with serving(app) as client:
        assert (await client.get("/dev/mailbox")).status_code == 404
        assert (await client.get("/dev/mailbox/x")).status_code == 404


async def test_mailbox_escapes_hostile_message(dev_app: Quart) -> None:
    import aiosmtplib

    async with serving(dev_app) as client:
        mailbox = dev_app.extensions["dev_mailbox"]
        raw = (
            "From: <script>alert(1)</script> <x@example.com>\r\n"
            "To: y@example.com\r\n"
            "Subject: <img src=x onerror=alert(1)>\r\n"
            "Content-Type: text/plain\r\n\r\n"
            'hello <script>alert(2)</script> http://example.com/"onmouseover=x\r\n'
        )
        await aiosmtplib.send(
            raw,
            sender="x@example.com",
            recipients=["y@example.com"],
            hostname=mailbox.host,
            port=mailbox.port,
            local_hostname="localhost",
            start_tls=False,
        )
        [path] = await _message_paths(client)
        page = await page_text(await client.get(path))
        listing = await page_text(await client.get("/dev/mailbox"))
    for text in (page, listing):
        assert "<script>alert" not in text
        assert "<img src=x" not in text
    assert 'onmouseover=x"' not in page


async def test_mailbox_hidden_from_other_hosts(dev_app: Quart) -> None:
    async with serving(dev_app) as client:
        response = await client.get(
            "/dev/mailbox", scope_base={"client": ("192.0.2.10", 40000)}
        )
        assert response.status_code == 404
        local = await client.get("/dev/mailbox")
        assert local.status_code == 200


async def test_mailbox_shows_malformed_message(dev_app: Quart) -> None:
    import aiosmtplib

    raw = (
        "From: x@example.com\r\n"
        "To: <\r\n"
        "Message-ID: <<<>>>@@\r\n"
        "Subject: Broken\r\n"
        "Content-Type: text/plain; charset=no-such-charset\r\n\r\n"
        "caf\xe9 body\r\n"
    ).encode("latin-1")
    async with serving(dev_app) as client:
        mailbox = dev_app.extensions["dev_mailbox"]
        await aiosmtplib.send(
            raw,
            sender="x@example.com",
            recipients=["y@example.com"],
            hostname=mailbox.host,
            port=mailbox.port,
            local_hostname="localhost",
            start_tls=False,
        )
        listing = await client.get("/dev/mailbox")
        assert listing.status_code == 200
        assert "Broken" in await page_text(listing)
        [path] = await _message_paths(client)
        detail = await client.get(path)
        assert detail.status_code == 200
        assert "caf" in await page_text(detail)


async def test_mailbox_shows_raw_8bit_header(dev_app: Quart) -> None:
    import aiosmtplib

    # A Latin-1 byte in a header, with no encoded-word around it, as a broken
    # mailer might send.
    raw = b"From: x@example.com\r\nSubject: Caf\xe9 menu\r\n\r\nhello\r\n"
    async with serving(dev_app) as client:
        mailbox = dev_app.extensions["dev_mailbox"]
        await aiosmtplib.send(
            raw,
            sender="x@example.com",
            recipients=["y@example.com"],
            hostname=mailbox.host,
            port=mailbox.port,
            local_hostname="localhost",
            start_tls=False,
        )
        listing = await client.get("/dev/mailbox")
        [path] = await _message_paths(client)
        detail = await client.get(path)
        page = await page_text(detail)
    assert listing.status_code == 200
    assert detail.status_code == 200
    assert "Caf\ufffd menu" in page
    assert "hello" in page


async def test_mailbox_open_to_mapped_loopback(dev_app: Quart) -> None:
    async with serving(dev_app) as client:
        response = await client.get(
            "/dev/mailbox", scope_base={"client": ("::ffff:127.0.0.1", 40000)}
        )
    assert response.status_code == 200
