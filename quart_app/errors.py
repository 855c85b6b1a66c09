"""The app's exceptions, with one root so callers can catch them all."""


class AppError(Exception):
    """Base class of the app's own errors."""


class ConfigError(SystemExit):
    """A setting is missing or invalid; the message names it and the fix.

    It derives from SystemExit, not AppError, because it exists to stop start-up:
    uncaught, the interpreter prints just the message, one line per invalid
    variable, and exits with status 1, with no traceback to dig through.
    """

    def __str__(self) -> str:
        return str(self.code)


class TokenError(AppError):
    """A token in a link cannot be used."""


class TokenInvalid(TokenError):
    """The token is malformed, tampered with, or made for another purpose."""


class TokenExpired(TokenError):
    """The token's signature is valid but its lifetime has passed."""


class DuplicateUser(AppError):
    """The email address or username is already registered."""

    def __init__(self, field: str) -> None:
        super().__init__(f"That {field} is already registered.")
        self.field = field


class IncorrectPassword(AppError):
    """The password given to confirm a change does not match the account's."""


class LoginThrottled(AppError):
    """The account had too many wrong passwords, so no password is checked for now.

    Wrong passwords at login, at `POST /api/tokens` and on the pages that ask
    for the current password all count.
    """

    def __init__(self, retry_after: int) -> None:
        minutes = max(1, round(retry_after / 60))
        super().__init__(
            "Too many wrong passwords for this account. Try again in about "
            f"{minutes} minute{'s' if minutes != 1 else ''}, or reset the password."
        )
        # Seconds until the next login attempt is checked.
        self.retry_after = retry_after


class OutboxMessageNotFound(AppError):
    """No outbox row has the given id."""

    def __init__(self, message_id: int) -> None:
        super().__init__(f"Outbox message {message_id} does not exist.")
        self.message_id = message_id


class OutboxMessageNotFailed(AppError):
    """The outbox row is not failed, so there is nothing to retry."""

    def __init__(self, message_id: int, status: str) -> None:
        super().__init__(
            f"Outbox message {message_id} is {status}, not failed: only a failed "
            "message can be retried."
        )
        self.message_id = message_id
        self.status = status
