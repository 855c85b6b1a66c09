"""Password hashing with argon2, run off the event loop.

One argon2 hash at the library's default cost uses 64 MiB of memory and about
0.1-0.2 s of CPU (0.18 s measured on a busy 2-core machine, argon2-cffi 25.1).
Hashing therefore runs on a small thread pool of its own, so the event loop keeps
serving and a burst of logins cannot take more memory than the pool's workers use.
"""

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from argon2.profiles import CHEAPEST
from quart import Quart, current_app


class PasswordHashing:
    """The hasher and the pool it runs on, one per app."""

    def __init__(self, *, cheap: bool = False) -> None:
        # The cheapest profile keeps the test suite fast. It is used only when
        # APP_ENV=testing.
        if cheap:
            self.hasher = PasswordHasher.from_parameters(CHEAPEST)
        else:
            self.hasher = PasswordHasher()
        self.workers = min(4, os.cpu_count() or 1)
        self._executor: ThreadPoolExecutor | None = None
        # A hash of a random password, checked when the account does not exist, so
        # a failed login takes as long whether or not the address is registered.
        self._dummy_hash: str | None = None

    @property
    def executor(self) -> ThreadPoolExecutor:
        """The thread pool that runs the hashes, started on first use."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(
                max_workers=self.workers,
                thread_name_prefix="password-hash",
            )
        return self._executor

    async def hash(self, password: str) -> str:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, self.hasher.hash, password)

    async def verify(self, password_hash: str | None, password: str) -> bool:
        """Check `password` against `password_hash`; None checks a dummy hash."""
        loop = asyncio.get_running_loop()
        if password_hash is None and self._dummy_hash is None:
            self._dummy_hash = await self.hash(os.urandom(16).hex())
        target: str = password_hash or self._dummy_hash or ""
        try:
            matched = await loop.run_in_executor(
                self.executor, self.hasher.verify, target, password
            )
        except (VerificationError, InvalidHashError):
            return False
        return matched and password_hash is not None

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None


def init_app(app: Quart) -> None:
    hashing = PasswordHashing(cheap=app.config["APP_ENV"] == "testing")
    app.extensions["password_hashing"] = hashing

    @app.after_serving
    async def _close_pool() -> None:
        hashing.close()


def _hashing() -> PasswordHashing:
    hashing: PasswordHashing = current_app.extensions["password_hashing"]
    return hashing


async def hash_password(password: str) -> str:
    return await _hashing().hash(password)


def needs_rehash(password_hash: str) -> bool:
    """Check whether the hash used other parameters than the current ones."""
    return _hashing().hasher.check_needs_rehash(password_hash)


async def verify_password(password_hash: str | None, password: str) -> bool:
    return await _hashing().verify(password_hash, password)
