"""WTForms forms with session-based CSRF protection.

Every form carries a hidden ``csrf_token`` input. The token is tied to the visitor's
session and signed with SECRET_KEY, so a POST without it, or with one from another
session, fails validation.
"""

from datetime import timedelta
from typing import Any, Self, cast

from email_validator import EmailNotValidError, validate_email
from quart import current_app, request, session
from wtforms import (
    BooleanField,
    EmailField,
    Field,
    Form,
    PasswordField,
    StringField,
)
from wtforms.csrf.session import SessionCSRF
from wtforms.validators import (
    DataRequired,
    EqualTo,
    Length,
    Regexp,
    ValidationError,
)

from quart_app.accounts import PASSWORD_MAX_LENGTH, PASSWORD_MIN_LENGTH
from quart_app.models import EMAIL_MAX_LENGTH, USERNAME_MAX_LENGTH


class AppForm(Form):
    class Meta:
        csrf = True
        csrf_class = SessionCSRF
        csrf_field_name = "csrf_token"
        csrf_time_limit = timedelta(hours=2)

        @property
        def csrf_secret(self) -> bytes:
            return current_app.secret_key.encode()  # type: ignore[union-attr]

        @property
        def csrf_context(self) -> Any:
            return session

    @classmethod
    async def from_request(cls) -> Self:
        """Build the form from the POSTed body, or empty for any other method."""
        if request.method != "POST":
            return cls()
        return cls(formdata=await request.form)

    def validate_on_submit(self) -> bool:
        return request.method == "POST" and self.validate()

    @property
    def csrf_failed(self) -> bool:
        """Whether validation failed on the CSRF token alone or among others."""
        return bool(self.errors.get("csrf_token"))


def add_error(field: Field, message: str) -> None:
    """Add an error found after validation, such as a duplicate address."""
    # WTForms keeps a field's errors in a list once validate() has run.
    cast(list[str], field.errors).append(message)


def _strip(value: str | None) -> str | None:
    return value.strip() if isinstance(value, str) else value


def _deliverable_address(_form: Form, field: Any) -> None:
    # Addresses with non-ASCII characters before the @ need SMTPUTF8, which
    # many relays lack, so they are rejected here rather than failing to send.
    # Non-ASCII domains are fine: they are sent in their ASCII (IDNA) form.
    if not field.data:
        return
    try:
        validate_email(field.data, check_deliverability=False, allow_smtputf8=False)
    except EmailNotValidError as error:
        raise ValidationError(f"Enter a valid email address. {error}") from None


def _no_control_characters(_form: Form, field: Any) -> None:
    if field.data and any(ord(char) < 32 or ord(char) == 127 for char in field.data):
        raise ValidationError("Remove the line breaks and control characters.")


_password_length = Length(
    min=PASSWORD_MIN_LENGTH,
    max=PASSWORD_MAX_LENGTH,
    message=f"Use {PASSWORD_MIN_LENGTH} to {PASSWORD_MAX_LENGTH} characters.",
)


def _email_field(label: str, *, new_address: bool) -> Any:
    """Build an email field.

    ``new_address`` adds the deliverability check that signup and a change of
    address need, and that looking up an account does not.
    """
    validators: list[Any] = [
        DataRequired(),
        _no_control_characters,
        Length(max=EMAIL_MAX_LENGTH),
    ]
    if new_address:
        validators.append(_deliverable_address)
    return EmailField(label, filters=[_strip], validators=validators)


def _current_password_field(label: str) -> Any:
    return PasswordField(
        label, validators=[DataRequired(), Length(max=PASSWORD_MAX_LENGTH)]
    )


def _repeated_password_field(label: str) -> Any:
    return PasswordField(
        label,
        validators=[
            DataRequired(),
            EqualTo("password", message="The passwords do not match."),
        ],
    )


class RegistrationForm(AppForm):
    email = _email_field("Email", new_address=True)
    username = StringField(
        "Username",
        validators=[
            DataRequired(),
            Length(min=1, max=USERNAME_MAX_LENGTH),
            Regexp(
                r"\A[A-Za-z][A-Za-z0-9_.]*\Z",
                message="Usernames start with a letter and contain only letters, "
                "digits, dots and underscores.",
            ),
        ],
    )
    password = PasswordField("Password", validators=[DataRequired(), _password_length])
    password2 = _repeated_password_field("Confirm password")


class LoginForm(AppForm):
    email = _email_field("Email", new_address=False)
    password = _current_password_field("Password")
    remember_me = BooleanField("Keep me logged in")


class EmptyForm(AppForm):
    """A form with only the CSRF token, for buttons such as "resend"."""


class PasswordResetRequestForm(AppForm):
    email = _email_field("Email", new_address=False)


class NewPasswordForm(AppForm):
    """A new password, typed twice, for the password reset page."""

    password = PasswordField(
        "New password", validators=[DataRequired(), _password_length]
    )
    password2 = _repeated_password_field("Confirm new password")


class ChangePasswordForm(NewPasswordForm):
    old_password = _current_password_field("Current password")


class ChangeEmailForm(AppForm):
    email = _email_field("New email", new_address=True)
    password = _current_password_field("Password")
