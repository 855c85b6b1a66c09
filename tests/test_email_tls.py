"""STARTTLS, implicit TLS and SMTP AUTH against real aiosmtpd relays.

The relays use a certificate for 127.0.0.1 from a throwaway CA made by trustme;
the app trusts that CA through MAIL_CA_FILE.
"""

import asyncio
import logging
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trustme
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from quart_app.errors import ConfigError
from tests.conftest import Relay, make_app, register, serving

USERNAME = "mailer"
PASSWORD = "relay secret"


@pytest.fixture(name="ca", scope="module")
def _ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(name="ca_file")
def _ca_file(ca: trustme.CA, tmp_path: Path) -> Path:
    path = tmp_path / "relay-ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


def _server_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    return context


class _Logins:
    """An aiosmtpd authenticator that accepts one user and records each try."""

    def __init__(self) -> None:
        self.attempts: list[tuple[str, bool]] = []

    def __call__(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        mechanism: str,
        auth_data: object,
    ) -> AuthResult:
        assert isinstance(auth_data, LoginPassword)
        login = auth_data.login.decode()
        accepted = login == USERNAME and auth_data.password.decode() == PASSWORD
        self.attempts.append((login, session.ssl is not None))
        return AuthResult(success=accepted, handled=False)


async def _start(
    relay: Relay, factory: object, *, ssl_context: ssl.SSLContext | None = None
) -> asyncio.Server:
    server = await asyncio.get_running_loop().create_server(
        factory, host="127.0.0.1", port=0, ssl=ssl_context
    )
    relay.port = server.sockets[0].getsockname()[1]
    return server


@pytest.fixture(name="logins")
def _logins() -> _Logins:
    return _Logins()


@pytest.fixture(name="starttls_relay")
async def _starttls_relay(ca: trustme.CA, logins: _Logins) -> AsyncIterator[Relay]:
    relay = Relay()
    context = _server_context(ca)
    server = await _start(
        relay,
        lambda: SMTP(
            relay,
            hostname="relay.test",
            tls_context=context,
            require_starttls=True,
            authenticator=logins,
            auth_required=True,
        ),
    )
    yield relay
    server.close()
    await server.wait_closed()


@pytest.fixture(name="ssl_relay")
async def _ssl_relay(ca: trustme.CA, logins: _Logins) -> AsyncIterator[Relay]:
    relay = Relay()
    server = await _start(
        relay,
        lambda: SMTP(
            relay,
            hostname="relay.test",
            authenticator=logins,
            # The connection is TLS from the first byte, which aiosmtpd does not
            # count as STARTTLS, so AUTH must be allowed without it. aiosmtpd
            # warns when AUTH is also required that way, so it is only offered.
            auth_require_tls=False,
        ),
        ssl_context=_server_context(ca),
    )
    yield relay
    server.close()
    await server.wait_closed()


async def test_starttls_with_auth_delivers(
    database_url: str,
    starttls_relay: Relay,
    logins: _Logins,
    ca_file: Path,
    tmp_path: Path,
) -> None:
    app = make_app(
        database_url,
        starttls_relay.port,
        tmp_path,
        APP_ADMIN=None,
        MAIL_USE_TLS=True,
        MAIL_USERNAME=USERNAME,
        MAIL_PASSWORD=PASSWORD,
        MAIL_CA_FILE=str(ca_file),
    )
    async with serving(app) as client:
        assert (await register(client)).status_code == 302
        message = await starttls_relay.next_message()
    assert "Confirm Your Account" in message["Subject"]
    # The login came after STARTTLS, on the encrypted connection.
    assert logins.attempts == [(USERNAME, True)]


async def test_implicit_tls_with_auth_delivers(
    database_url: str, ssl_relay: Relay, logins: _Logins, ca_file: Path, tmp_path: Path
) -> None:
    app = make_app(
        database_url,
        ssl_relay.port,
        tmp_path,
        APP_ADMIN=None,
        MAIL_USE_SSL=True,
        MAIL_USERNAME=USERNAME,
        MAIL_PASSWORD=PASSWORD,
        MAIL_CA_FILE=str(ca_file),
    )
    async with serving(app) as client:
        assert (await register(client)).status_code == 302
        message = await ssl_relay.next_message()
    assert "Confirm Your Account" in message["Subject"]
    assert [login for login, _ in logins.attempts] == [USERNAME]


async def test_untrusted_certificate_not_sent(
    database_url: str,
    starttls_relay: Relay,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Without MAIL_CA_FILE the throwaway CA is unknown, so the handshake fails.
    app = make_app(
        database_url,
        starttls_relay.port,
        tmp_path,
        APP_ADMIN=None,
        MAIL_USE_TLS=True,
        MAIL_USERNAME=USERNAME,
        MAIL_PASSWORD=PASSWORD,
    )
    async with serving(app) as client:
        assert (await register(client)).status_code == 302
    assert starttls_relay.messages == []
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("CERTIFICATE_VERIFY_FAILED" in text for text in warnings)


async def test_wrong_password_kept_for_retry(
    database_url: str,
    starttls_relay: Relay,
    ca_file: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = make_app(
        database_url,
        starttls_relay.port,
        tmp_path,
        APP_ADMIN=None,
        MAIL_USE_TLS=True,
        MAIL_USERNAME=USERNAME,
        MAIL_PASSWORD="wrong",
        MAIL_CA_FILE=str(ca_file),
    )
    async with serving(app) as client:
        assert (await register(client)).status_code == 302
    assert starttls_relay.messages == []
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("check MAIL_USERNAME and MAIL_PASSWORD" in text for text in warnings)


async def test_plain_relay_rejects_starttls(
    database_url: str,
    relay: Relay,
    ca_file: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The recording relay offers no STARTTLS, so MAIL_USE_TLS must not fall back
    # to sending in the clear.
    app = make_app(
        database_url,
        relay.port,
        tmp_path,
        APP_ADMIN=None,
        MAIL_USE_TLS=True,
        MAIL_CA_FILE=str(ca_file),
    )
    async with serving(app) as client:
        assert (await register(client)).status_code == 302
    assert relay.messages == []
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("STARTTLS" in text or "starttls" in text.lower() for text in warnings)


def test_missing_ca_file_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        make_app(
            "sqlite+aiosqlite:///unused.db",
            25,
            tmp_path,
            MAIL_CA_FILE=str(tmp_path / "missing.pem"),
        )
    assert str(caught.value).startswith("Invalid setting MAIL_CA_FILE=")
