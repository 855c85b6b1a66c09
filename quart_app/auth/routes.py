import string
from datetime import timedelta
from urllib.parse import quote, urlsplit

from quart import (
    Blueprint,
    current_app,
    flash,
    g,
    redirect,
    render_template,
    request,
    url_for,
)
from quart.typing import ResponseReturnValue
from quart_auth import (
    AuthUser,
    current_user,
    login_required,
    login_user,
    logout_user,
)

from quart_app import accounts
from quart_app.auth.forms import (
    AppForm,
    ChangeEmailForm,
    ChangePasswordForm,
    EmptyForm,
    LoginForm,
    NewPasswordForm,
    PasswordResetRequestForm,
    RegistrationForm,
    add_error,
)
from quart_app.db import get_session
from quart_app.errors import (
    DuplicateUser,
    IncorrectPassword,
    LoginThrottled,
    TokenError,
    TokenExpired,
)
from quart_app.models import User, find_user_by_auth_id, normalize_email, utcnow

bp = Blueprint("auth", __name__, url_prefix="/auth")

# last_seen is written at most this often, so browsing does not write on every request.
LAST_SEEN_INTERVAL = timedelta(minutes=5)
# Pages an unconfirmed user may still open.
_OPEN_TO_UNCONFIRMED = {"static", "main.healthz"}


@bp.before_app_request
async def load_account() -> ResponseReturnValue | None:
    g.account = None
    # The JSON API authenticates with bearer tokens alone, so a login cookie
    # neither identifies the caller there nor redirects an unconfirmed one.
    if request.path.startswith("/api/"):
        return None
    if request.endpoint == "static" or not await current_user.is_authenticated:
        return None

    session = get_session()
    account = await find_user_by_auth_id(
        session=session, auth_id=current_user.auth_id or ""
    )
    if account is None:
        # The account is gone or its password changed since this cookie was set.
        logout_user()
        return None
    g.account = account

    now = utcnow()
    if now - account.last_seen > LAST_SEEN_INTERVAL:
        account.last_seen = now
        await session.commit()

    if (
        not account.confirmed
        and request.blueprint not in ("auth", "dev", "docs")
        and request.endpoint not in _OPEN_TO_UNCONFIRMED
    ):
        return redirect(url_for("auth.unconfirmed"))
    return None


@bp.route("/register", methods=["GET", "POST"])
async def register() -> ResponseReturnValue:
    form = await RegistrationForm.from_request()
    if not form.validate_on_submit():
        return await _render_form("auth/register.html", form)

    user = await _register(form)
    if user is None:
        return await _render_form("auth/register.html", form)

    login_user(AuthUser(user.auth_id))
    await flash("A confirmation email is on its way to your address.", "info")
    return redirect(url_for("auth.unconfirmed"))


@bp.route("/login", methods=["GET", "POST"])
async def login() -> ResponseReturnValue:
    form = await LoginForm.from_request()
    if not form.validate_on_submit():
        return await _render_form("auth/login.html", form)

    session = get_session()
    try:
        user = await accounts.authenticate(
            session=session,
            email=form.email.data or "",
            password=form.password.data or "",
        )
    except LoginThrottled as error:
        return await _render_throttled("auth/login.html", form, error)
    if user is None:
        await flash("Invalid email or password.", "error")
        return await _render_form("auth/login.html", form)

    # Saves the new hash when `authenticate` rehashed the password.
    await session.commit()
    login_user(AuthUser(user.auth_id), remember=bool(form.remember_me.data))
    return redirect(_local_path(request.args.get("next")) or url_for("main.index"))


@bp.route("/logout", methods=["GET", "POST"])
async def logout() -> ResponseReturnValue:
    logout_user()
    await flash("You have been logged out.", "info")
    return redirect(url_for("main.index"))


@bp.get("/confirm/<token>")
async def confirm(token: str) -> ResponseReturnValue:
    session = get_session()
    try:
        user, already = await accounts.confirm_account(session=session, token=token)
    except TokenError as error:
        return await _render_token_error(error, retry_endpoint="auth.unconfirmed")

    await session.commit()
    return await render_template("auth/confirmed.html", user=user, already=already)


@bp.post("/confirm")
async def resend_confirmation() -> ResponseReturnValue:
    account: User | None = g.account
    if account is None:
        return redirect(url_for("auth.login", next=url_for("auth.unconfirmed")))
    if account.confirmed:
        await flash("Your account is already confirmed.", "info")
        return redirect(url_for("main.index"))

    form = await EmptyForm.from_request()
    if not form.validate():
        await flash(
            "The form was missing its security token or it had expired. "
            "Please press the button again.",
            "error",
        )
        return await render_template("auth/unconfirmed.html", form=form), 400

    session = get_session()
    if not await accounts.resend_confirmation(session=session, user=account):
        interval = current_app.config["CONFIRMATION_RESEND_INTERVAL"]
        await flash(
            "A confirmation email was sent less than "
            f"{interval} seconds ago. Check your inbox, or try again shortly.",
            "error",
        )
        return redirect(url_for("auth.unconfirmed"))

    await session.commit()
    await flash("A new confirmation email is on its way to your address.", "info")
    return redirect(url_for("auth.unconfirmed"))


@bp.get("/unconfirmed")
async def unconfirmed() -> ResponseReturnValue:
    account: User | None = g.account
    if account is None:
        return redirect(url_for("auth.login"))
    if account.confirmed:
        return redirect(url_for("main.index"))
    return await render_template("auth/unconfirmed.html", form=EmptyForm())


@bp.route("/reset", methods=["GET", "POST"])
async def password_reset_request() -> ResponseReturnValue:
    # Logged-in users may ask too, because a browser can stay logged in long
    # after its user forgot the password, and a change needs the old one.
    form = await PasswordResetRequestForm.from_request()
    if not form.validate_on_submit():
        return await _render_form("auth/reset_request.html", form)

    session = get_session()
    await accounts.request_password_reset(session=session, email=form.email.data or "")
    await session.commit()
    # The same message whether or not the address is registered.
    await flash(
        "If an account uses that address, an email with a link to reset its "
        "password has been sent to it.",
        "info",
    )
    return redirect(url_for("auth.login"))


@bp.route("/reset/<token>", methods=["GET", "POST"])
async def password_reset(token: str) -> ResponseReturnValue:
    session = get_session()
    form = await NewPasswordForm.from_request()
    try:
        await accounts.verify_reset_token(session=session, token=token)
        if not form.validate_on_submit():
            return await _render_form("auth/reset_password.html", form)
        await accounts.reset_password(
            session=session, token=token, password=form.password.data or ""
        )
    except TokenError as error:
        return await _render_token_error(
            error, retry_endpoint="auth.password_reset_request"
        )

    await session.commit()
    # The browser that reset the password logs in again with the new one, even
    # if it was logged in as another user.
    logout_user()
    await flash("Your password has been reset. Log in with the new one.", "info")
    return redirect(url_for("auth.login"))


@bp.route("/change-password", methods=["GET", "POST"])
@login_required
async def change_password() -> ResponseReturnValue:
    form = await ChangePasswordForm.from_request()
    if not form.validate_on_submit():
        return await _render_form("auth/change_password.html", form)

    account: User = g.account
    session = get_session()
    try:
        changed = await accounts.change_password(
            session=session,
            user=account,
            old_password=form.old_password.data or "",
            password=form.password.data or "",
        )
    except LoginThrottled as error:
        return await _render_throttled("auth/change_password.html", form, error)
    if not changed:
        add_error(form.old_password, "The current password is incorrect.")
        return await _render_form("auth/change_password.html", form)

    await session.commit()
    # The new password hash ends every login, this one included, unless this
    # browser gets a cookie with the new auth id.
    # NOTE: the new cookie lasts until the browser closes even if the old one
    # was "Keep me logged in", because the request does not show which it was.
    login_user(AuthUser(account.auth_id))
    await flash("Your password has been changed. Other devices are logged out.", "info")
    return redirect(url_for("main.index"))


@bp.route("/change-email", methods=["GET", "POST"])
@login_required
async def change_email_request() -> ResponseReturnValue:
    form = await ChangeEmailForm.from_request()
    if not form.validate_on_submit():
        return await _render_form("auth/change_email.html", form)

    try:
        sent = await _request_email_change(form)
    except LoginThrottled as error:
        return await _render_throttled("auth/change_email.html", form, error)
    if not sent:
        return await _render_form("auth/change_email.html", form)

    await get_session().commit()
    new_email = normalize_email(form.email.data or "")
    await flash(
        f"An email with a confirmation link has been sent to {new_email}. "
        "Your address changes when you open the link.",
        "info",
    )
    return redirect(url_for("main.index"))


@bp.get("/change-email/<token>")
async def change_email(token: str) -> ResponseReturnValue:
    session = get_session()
    try:
        user = await accounts.change_email(session=session, token=token)
    except TokenError as error:
        return await _render_token_error(
            error, retry_endpoint="auth.change_email_request"
        )
    except DuplicateUser:
        page = await render_template(
            "auth/token_error.html",
            taken=True,
            retry_url=url_for("auth.change_email_request"),
        )
        return page, 409

    await session.commit()
    return await render_template("auth/email_changed.html", user=user)


async def _register(form: RegistrationForm) -> User | None:
    """Register the user and commit, or return None with the form's errors set."""
    session = get_session()
    try:
        user = await accounts.register_user(
            session=session,
            email=form.email.data or "",
            username=form.username.data or "",
            password=form.password.data or "",
        )
    except DuplicateUser as error:
        if error.field == "username":
            add_error(form.username, "That username is already taken.")
        else:
            add_error(form.email, "That email address is already registered.")
        return None

    await session.commit()
    return user


async def _request_email_change(form: ChangeEmailForm) -> bool:
    """Queue the email to the new address, or set the form's errors and return False."""
    account: User = g.account
    if normalize_email(form.email.data or "") == account.email:
        add_error(form.email, "That is already your email address.")
        return False

    try:
        sent = await accounts.request_email_change(
            session=get_session(),
            user=account,
            new_email=form.email.data or "",
            password=form.password.data or "",
        )
    except IncorrectPassword:
        add_error(form.password, "The password is incorrect.")
        return False
    except DuplicateUser:
        add_error(form.email, "That email address is already registered.")
        return False

    if not sent:
        interval = current_app.config["EMAIL_CHANGE_INTERVAL"]
        add_error(
            form.email,
            f"An email to confirm a new address was sent less than {interval} "
            "seconds ago. Check that inbox, or try again shortly.",
        )
    return sent


async def _render_throttled(
    template: str, form: AppForm, error: LoginThrottled
) -> ResponseReturnValue:
    await flash(str(error), "error")
    page = await render_template(template, form=form)
    return page, 429, {"Retry-After": str(error.retry_after)}


async def _render_form(template: str, form: AppForm) -> ResponseReturnValue:
    status = 200
    if form.csrf_failed:
        status = 400
        await flash(
            "The form was missing its security token or it had expired. "
            "Please submit it again.",
            "error",
        )
    return await render_template(template, form=form), status


async def _render_token_error(
    error: TokenError, *, retry_endpoint: str
) -> ResponseReturnValue:
    """Render the page for an unusable link, with a link to ask for a new one."""
    page = await render_template(
        "auth/token_error.html",
        expired=isinstance(error, TokenExpired),
        retry_url=url_for(retry_endpoint),
    )
    return page, 400


def _local_path(target: str | None) -> str | None:
    """Return `target` if it is a path on this site, else None."""
    if not target or not target.startswith("/") or target.startswith("//"):
        return None
    # Some clients skip control and other unprintable characters in a Location,
    # reading "/\x7f/host" as "//host", which is another site.
    if "\\" in target or not target.isprintable():
        return None
    parts = urlsplit(target)
    if parts.scheme or parts.netloc:
        return None
    # A Location header is ASCII, so other characters are percent-encoded as
    # UTF-8, and characters that are already ASCII are kept as they are.
    return quote(target, safe=string.punctuation)
