"""Signed, expiring tokens for the links in emails.

Each purpose has its own salt, so a confirmation token cannot be used to reset a
password. Tokens are signed with SECRET_KEY and expire after TOKEN_MAX_AGE seconds.
"""

import time
from enum import StrEnum
from typing import Any, cast

from itsdangerous import BadSignature, SignatureExpired, URLSafeTimedSerializer
from itsdangerous.timed import TimestampSigner
from quart import current_app

from quart_app.errors import TokenExpired, TokenInvalid


class Purpose(StrEnum):
    CONFIRM = "confirm"
    RESET_PASSWORD = "reset-password"
    CHANGE_EMAIL = "change-email"


class _IssuedAtSigner(TimestampSigner):
    """A signer whose timestamp may be set, so a token can be issued in the past."""

    issued_at: int | None = None

    def get_timestamp(self) -> int:
        return int(time.time()) if self.issued_at is None else self.issued_at


def _serializer(purpose: Purpose) -> URLSafeTimedSerializer:
    secret_key = current_app.secret_key
    if secret_key is None:
        raise RuntimeError("SECRET_KEY is not set, so no token can be signed")
    return URLSafeTimedSerializer(
        secret_key,
        salt=f"quart-app/{purpose.value}",
        signer=_IssuedAtSigner,
    )


def generate_token(
    purpose: Purpose, payload: dict[str, Any], *, issued_at: int | None = None
) -> str:
    """Sign `payload` for `purpose`.

    Arguments:
        purpose: What the token may be used for.
        payload: JSON-serialisable data, such as the user id.
        issued_at: A Unix time to sign the token as of; the current time by default.
    """
    serializer = _serializer(purpose)
    signer = cast(_IssuedAtSigner, serializer.make_signer(serializer.salt))
    signer.issued_at = issued_at
    return signer.sign(serializer.dump_payload(payload)).decode()


def load_token(purpose: Purpose, token: str) -> dict[str, Any]:
    """Verify `token` for `purpose` and return its payload.

    Raises:
        TokenExpired: the signature is valid but older than TOKEN_MAX_AGE.
        TokenInvalid: the token is malformed, tampered with, or for another purpose.
    """
    max_age = current_app.config["TOKEN_MAX_AGE"]
    try:
        payload = _serializer(purpose).loads(token, max_age=max_age)
    except SignatureExpired:
        raise TokenExpired(f"The {purpose.value} link has expired.") from None
    except BadSignature:
        raise TokenInvalid(f"The {purpose.value} link is invalid.") from None
    if not isinstance(payload, dict):
        raise TokenInvalid(f"The {purpose.value} link is invalid.")
    return payload
