import subprocess
import sys
from pathlib import Path

import pytest

from quart_app import create_app
from quart_app.config import Settings, load_settings
from quart_app.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("true", True),
        ("TRUE", True),
        ("1", True),
        ("yes", True),
        ("On", True),
        ("false", False),
        ("False", False),
        ("0", False),
        ("no", False),
        ("OFF", False),
        (" yes ", True),
    ],
)
def test_boolean_accepted_spellings(
    monkeypatch: pytest.MonkeyPatch, text: str, expected: bool
) -> None:
    monkeypatch.setenv("MAIL_USE_TLS", text)
    assert load_settings().MAIL_USE_TLS is expected


@pytest.mark.parametrize("text", ["maybe", "2", "t", "y", "truee", "-1", "enabled"])
def test_boolean_other_text_rejected(
    monkeypatch: pytest.MonkeyPatch, text: str
) -> None:
    monkeypatch.setenv("MAIL_USE_SSL", text)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    message = str(caught.value)
    assert "MAIL_USE_SSL" in message
    assert "true/false, 1/0, yes/no, on/off" in message
    assert "\n" not in message


def test_tls_and_ssl_together_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAIL_USE_TLS", "yes")
    monkeypatch.setenv("MAIL_USE_SSL", "yes")
    with pytest.raises(ConfigError) as caught:
        load_settings()
    message = str(caught.value)
    assert "MAIL_USE_TLS" in message
    assert "MAIL_USE_SSL" in message
    assert "set only one" in message


@pytest.mark.parametrize("missing", ["SECRET_KEY", "APP_BASE_URL", "MAIL_SERVER"])
def test_production_requires_settings(
    monkeypatch: pytest.MonkeyPatch, missing: str
) -> None:
    values = {
        "APP_ENV": "production",
        "SECRET_KEY": "s3cret-for-tests",
        "APP_BASE_URL": "https://app.example",
        "MAIL_SERVER": "smtp.example",
    }
    for name, value in values.items():
        if name != missing:
            monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert missing in str(caught.value)
    assert "APP_ENV=production" in str(caught.value)


def test_production_accepts_complete_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APP_ENV", "production")
    monkeypatch.setenv("SECRET_KEY", "s3cret-for-tests")
    monkeypatch.setenv("APP_BASE_URL", "https://app.example/")
    monkeypatch.setenv("MAIL_SERVER", "smtp.example")
    settings = load_settings()
    assert settings.APP_BASE_URL == "https://app.example"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("APP_ENV", "prod"),
        ("MAIL_PORT", "abc"),
        ("MAIL_PORT", "0"),
        ("MAIL_PORT", "70000"),
        ("APP_BASE_URL", "example.com"),
        ("APP_BASE_URL", "ftp://example.com"),
        ("APP_BASE_URL", "https://example.com/app"),
        ("APP_BASE_URL", "https://example.com/?next=x"),
        ("APP_BASE_URL", "https://user:pw@example.com"),
        ("APP_BASE_URL", "https://example.com:99999"),
        ("APP_ADMIN", "not-an-address"),
        ("TOKEN_MAX_AGE", "0"),
        ("TOKEN_MAX_AGE", "an hour"),
        ("MAIL_TIMEOUT", "-1"),
        ("MAIL_SUBJECT_PREFIX", "[App]\r\nBcc: victim@example.com"),
        ("MAIL_DEFAULT_SENDER", "a@example.com\nBcc: victim@example.com"),
        ("LOG_LEVEL", "LOUD"),
        ("APP_ADMIN", "josé@example.com"),
        ("MAIL_DEFAULT_SENDER", "not an address"),
        ("MAIL_TIMEOUT", "inf"),
        ("OUTBOX_POLL_INTERVAL", "nan"),
        ("DATABASE_URL", "notaurl"),
        ("DATABASE_URL", "postgresql://postgres@127.0.0.1/test"),
        ("DATABASE_URL", "sqlite:///app.db"),
        ("DATABASE_URL", "mysql+aiomysql://root@127.0.0.1/test"),
        ("MAIL_MAX_CONNECTIONS", "0"),
        ("APP_BASE_URL", "http://exa mple.com"),
        ("APP_BASE_URL", "http://under_score.example"),
        ("APP_BASE_URL", "http://-dash.example"),
        ("APP_BASE_URL", "http://bücher.example"),
        ("APP_BASE_URL", "http://127.1:8000"),
        ("APP_BASE_URL", "http://0x7f.1"),
        ("APP_BASE_URL", "http://app.example.123"),
        ("MAIL_MAX_AGE", "1e300"),
        ("OUTBOX_LEASE", "1000000000000"),
        ("CONFIRMATION_RESEND_INTERVAL", "1000000000000"),
        ("TOKEN_MAX_AGE", "99999999999"),
        ("MAIL_MAX_ATTEMPTS", "100000"),
        ("MAIL_RETRY_DELAY", "1e20"),
        ("BACKGROUND_TASK_SHUTDOWN_TIMEOUT", "1e9"),
    ],
)
def test_invalid_value_names_variable(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    message = str(caught.value)
    assert message.startswith(f"Invalid setting {name}=")
    assert "\n" not in message


@pytest.mark.parametrize(
    "value",
    [
        "http://127.0.0.1:8000",
        "http://[::1]:8000",
        "https://app.example.com",
        "https://xn--bcher-kva.example",
        "http://localhost.",
    ],
)
def test_base_url_hosts_accepted(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("APP_BASE_URL", value)
    assert load_settings().APP_BASE_URL == value


@pytest.mark.parametrize("name", ["MAIL_USE_TLS", "MAIL_USE_SSL", "OUTBOX_WORKER"])
def test_empty_boolean_means_default(
    monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    monkeypatch.setenv(name, "")
    settings = load_settings()
    assert getattr(settings, name) is Settings.model_fields[name].default


def test_short_secret_rejected_in_production(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APP_ENV", "production")
    monkeypatch.setenv("SECRET_KEY", "short")
    monkeypatch.setenv("APP_BASE_URL", "https://app.example")
    monkeypatch.setenv("MAIL_SERVER", "smtp.example")
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert "SECRET_KEY is too short" in str(caught.value)
    assert "short" not in str(caught.value).replace("too short", "")


def test_unwritable_instance_path_rejected(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ConfigError) as caught:
        create_app({"INSTANCE_PATH": str(blocker / "instance")})
    assert str(caught.value).startswith("Invalid setting INSTANCE_PATH=")
    assert "\n" not in str(caught.value)


def test_secret_values_not_echoed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAIL_USERNAME", "mailer")
    monkeypatch.setenv("MAIL_PASSWORD", "hunter2-secret")
    monkeypatch.setenv("MAIL_PORT", "not a port")
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert "hunter2-secret" not in str(caught.value)


def test_username_without_password_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAIL_USERNAME", "mailer")
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert "MAIL_USERNAME and MAIL_PASSWORD" in str(caught.value)


def test_lease_shorter_than_sends_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAIL_TIMEOUT", "130")
    with pytest.raises(ConfigError) as caught:
        load_settings()
    message = str(caught.value)
    assert "OUTBOX_LEASE (120 s)" in message
    assert "MAIL_TIMEOUT (130 s)" in message
    assert "\n" not in message


def test_lease_four_timeouts_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAIL_TIMEOUT", "130")
    monkeypatch.setenv("OUTBOX_LEASE", "520")
    assert load_settings().OUTBOX_LEASE == 520


@pytest.mark.parametrize(
    ("environment", "port"),
    [({}, 25), ({"MAIL_USE_TLS": "yes"}, 587), ({"MAIL_USE_SSL": "on"}, 465)],
)
def test_mail_port_follows_tls_mode(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, environment: dict, port: int
) -> None:
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("INSTANCE_PATH", str(tmp_path))
    app = create_app({"MAIL_SERVER": "smtp.example"})
    assert app.config["MAIL_PORT"] == port


def test_overrides_win_over_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("MAIL_SUBJECT_PREFIX", "[From env]")
    app = create_app(
        {"MAIL_SUBJECT_PREFIX": "[Override]", "INSTANCE_PATH": str(tmp_path)}
    )
    assert app.config["MAIL_SUBJECT_PREFIX"] == "[Override]"


def test_development_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("INSTANCE_PATH", str(tmp_path))
    app = create_app()
    assert app.config["APP_ENV"] == "development"
    assert app.config["DATABASE_URL"] == f"sqlite+aiosqlite:///{tmp_path / 'app.db'}"
    assert app.config["DEV_MAILBOX"] is True
    assert app.config["APP_BASE_URL"] == "http://127.0.0.1:8000"
    assert app.config["QUART_AUTH_COOKIE_SECURE"] is False
    # The generated key is kept, so a restart or a second worker reuses it.
    again = create_app()
    assert again.secret_key == app.secret_key
    assert (tmp_path / "secret_key").stat().st_mode & 0o077 == 0


def test_development_with_relay_has_no_mailbox(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("INSTANCE_PATH", str(tmp_path))
    monkeypatch.setenv("MAIL_SERVER", "127.0.0.1")
    app = create_app()
    assert app.config["DEV_MAILBOX"] is False
    assert "dev_mailbox" not in app.extensions


def test_create_app_connects_nothing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # An unreachable database would fail at once if create_app connected.
    monkeypatch.setenv("DATABASE_URL", "postgresql+asyncpg://nobody@127.0.0.1:1/none")
    monkeypatch.setenv("INSTANCE_PATH", str(tmp_path))
    app = create_app()
    assert "db_engine" not in app.extensions


def test_invalid_setting_exits_one_line(tmp_path: Path) -> None:
    environment = {
        "PATH": "/usr/bin:/bin",
        "INSTANCE_PATH": str(tmp_path),
        "MAIL_USE_TLS": "maybe",
    }
    completed = subprocess.run(
        [sys.executable, "-c", "from quart_app import create_app; create_app()"],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert completed.returncode == 1
    lines = completed.stderr.strip().splitlines()
    expected = (
        "Invalid setting MAIL_USE_TLS='maybe': "
        "use one of true/false, 1/0, yes/no, on/off."
    )
    assert lines == [expected]


@pytest.mark.parametrize(
    ("base_url", "sender"),
    [
        ("https://app.example.com", "Quart App <noreply@app.example.com>"),
        ("http://127.0.0.1:8000", "Quart App <noreply@localhost>"),
        ("http://[::1]:8000", "Quart App <noreply@localhost>"),
    ],
)
def test_default_sender_from_base_url(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, base_url: str, sender: str
) -> None:
    monkeypatch.setenv("INSTANCE_PATH", str(tmp_path))
    monkeypatch.setenv("APP_BASE_URL", base_url)
    assert create_app().config["MAIL_DEFAULT_SENDER"] == sender


def test_admin_address_spaces_stripped(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("INSTANCE_PATH", str(tmp_path))
    monkeypatch.setenv("APP_ADMIN", " Boss@Example.COM ")
    assert create_app().config["APP_ADMIN"] == "boss@example.com"
