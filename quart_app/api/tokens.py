"""Bearer tokens for the JSON API.

A token is signed with SECRET_KEY under a salt of its own, so no token from an
email link can serve as one, and it expires after API_TOKEN_MAX_AGE seconds. Its
payload is the user's `auth_id`, which contains a fingerprint of the password
hash, so a password change revokes every token issued before it.
"""

import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import cast

from itsdangerous import BadSignature, SignatureExpired, URLSafeTimedSerializer
from itsdangerous.timed import TimestampSigner
from quart import current_app
from sqlalchemy.ext.asyncio import AsyncSession

from quart_app.errors import TokenExpired, TokenInvalid
from quart_app.models import User, find_user_by_auth_id

SALT = "quart-app/api-token"


@dataclass(frozen=True)
class IssuedToken:
    token: str
    expires_at: datetime


class _IssuedAtSigner(TimestampSigner):
    """A signer whose timestamp may be set, so tests can issue old tokens."""

    issued_at: int | None = None

    def get_timestamp(self) -> int:
        return int(time.time()) if self.issued_at is None else self.issued_at


def issue_token(user: User, *, issued_at: int | None = None) -> IssuedToken:
    """Sign a bearer token for `user`.

    Arguments:
        user: The account the token authenticates.
        issued_at: A Unix time to sign the token as of; the current time by default.
    """
    serializer = _serializer()
    signer = cast(_IssuedAtSigner, serializer.make_signer(serializer.salt))
    signer.issued_at = int(time.time()) if issued_at is None else issued_at
    token = signer.sign(serializer.dump_payload({"sub": user.auth_id})).decode()
    max_age = current_app.config["API_TOKEN_MAX_AGE"]
    expires_at = datetime.fromtimestamp(signer.issued_at, UTC) + timedelta(
        seconds=max_age
    )
    return IssuedToken(token=token, expires_at=expires_at)


async def load_token_user(*, session: AsyncSession, token: str) -> User:
    """Verify a bearer token and return the user it was issued to.

    Raises:
        TokenExpired: the signature is valid but older than API_TOKEN_MAX_AGE.
        TokenInvalid: the token is malformed, tampered with, made for another
            purpose, or issued before the user's last password change.
    """
    max_age = current_app.config["API_TOKEN_MAX_AGE"]
    try:
        payload = _serializer().loads(token, max_age=max_age)
    except SignatureExpired:
        raise TokenExpired("The bearer token has expired.") from None
    except BadSignature:
        raise TokenInvalid("The bearer token is invalid.") from None

    auth_id = payload.get("sub") if isinstance(payload, dict) else None
    if not isinstance(auth_id, str):
        raise TokenInvalid("The bearer token is invalid.")
    user = await find_user_by_auth_id(session=session, auth_id=auth_id)
    if user is None:
        raise TokenInvalid(
            "The bearer token was revoked: the password changed or the account is gone."
        )
    return user


def _serializer() -> URLSafeTimedSerializer:
    secret_key = current_app.secret_key
    if secret_key is None:
        raise RuntimeError("SECRET_KEY is not set, so no token can be signed")
    return URLSafeTimedSerializer(secret_key, salt=SALT, signer=_IssuedAtSigner)
