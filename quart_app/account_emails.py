"""Account emails: confirmation, password reset and change of address.

Also the notices of a changed password or address, and the administrator's "New
User" notice.
"""

from typing import Any

from quart import current_app, url_for
from sqlalchemy.ext.asyncio import AsyncSession

from quart_app.email import send_email
from quart_app.models import User
from quart_app.tokens import Purpose, generate_token


def external_url(endpoint: str, **values: Any) -> str:
    """Build an absolute URL on APP_BASE_URL.

    The host comes from the settings, never from the request's Host header, so a
    forged header cannot point a link in an email at another site.
    """
    base_url: str = current_app.config["APP_BASE_URL"]
    return base_url + url_for(endpoint, **values)


async def send_confirmation(user: User, *, session: AsyncSession) -> None:
    token = generate_token(Purpose.CONFIRM, {"confirm": user.id, "email": user.email})
    await send_email(
        user.email,
        "Confirm Your Account",
        "email/confirm",
        session=session,
        user=user,
        confirm_url=external_url("auth.confirm", token=token),
    )


async def send_password_reset(user: User, token: str, *, session: AsyncSession) -> None:
    await send_email(
        user.email,
        "Reset Your Password",
        "email/reset_password",
        session=session,
        user=user,
        reset_url=external_url("auth.password_reset", token=token),
    )


async def send_email_change(
    user: User, new_email: str, token: str, *, session: AsyncSession
) -> None:
    """Queue the email that confirms `new_email`, sent to that new address."""
    await send_email(
        new_email,
        "Confirm Your Email Address",
        "email/change_email",
        session=session,
        user=user,
        new_email=new_email,
        change_url=external_url("auth.change_email", token=token),
    )


async def send_password_changed_notice(user: User, *, session: AsyncSession) -> None:
    """Tell the account's address that its password changed, in case it was not
    the owner who changed it."""
    await send_email(
        user.email,
        "Your Password Was Changed",
        "email/password_changed",
        session=session,
        user=user,
        reset_url=external_url("auth.password_reset_request"),
    )


async def send_email_changed_notice(
    user: User, old_email: str, *, session: AsyncSession
) -> None:
    """Tell the account's previous address where its email now goes."""
    await send_email(
        old_email,
        "Your Email Address Was Changed",
        "email/email_changed",
        session=session,
        user=user,
        old_email=old_email,
    )


async def send_new_user_notice(user: User, *, session: AsyncSession) -> None:
    admin = current_app.config["APP_ADMIN"]
    if admin is None:
        return
    await send_email(admin, "New User", "email/new_user", session=session, user=user)
