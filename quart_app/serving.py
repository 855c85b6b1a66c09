"""SIGTERM handling for the app in a worker process of hypercorn.

hypercorn 0.18 (`hypercorn/run.py`) runs the app in worker processes whenever
`workers` is 1 or more. On SIGTERM or SIGINT its main process sets a shared
shutdown event, which each worker polls every 0.1 s to start its graceful
shutdown. The main process waits only until the first worker has exited,
though, and then calls `Process.terminate()` on the others. hypercorn installs
no SIGTERM handler in such a worker, because the event stops it. So a worker
still finishing requests or sends at that moment is killed. Its requests are
cut, and its outbox rows stay in `sending` until their lease expires.
"""

import asyncio
import logging
import multiprocessing
import os
import signal
from multiprocessing.process import BaseProcess

from quart import Quart

__all__ = ("init_app",)

logger = logging.getLogger(__name__)


def init_app(app: Quart) -> None:
    """Make a hypercorn worker ignore SIGTERM while hypercorn's main process runs.

    The main process sets the shutdown event before it sends SIGTERM to a
    worker, so the worker still stops, gracefully. Once `run` returns, Python's
    multiprocessing joins the remaining workers before the main process exits
    (Python 3.11, `multiprocessing/util.py`, `_exit_function`), so the main
    process waits for them. A worker whose main process is gone exits on
    SIGTERM as it would without the handler.

    NOTE: if `run` raises, for example because a worker fails to start, the main
    process sends SIGTERM at exit without setting the event. Its workers then
    keep serving, and it keeps waiting for them, until it is signalled again.

    Does nothing unless the app is served in a worker process that hypercorn
    started: not under `app.test_app()`, the `quart` commands, hypercorn with
    `--workers 0` or another server.
    """

    @app.before_serving
    async def _install_sigterm_handler() -> None:
        main_process = multiprocessing.parent_process()
        if main_process is None or not _is_hypercorn_worker():
            return
        # If a later hypercorn handles SIGTERM in its workers, its handler stays.
        if signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
            return

        loop = asyncio.get_running_loop()
        handler = _SigtermHandler(loop, main_process)
        # The handler stays until hypercorn closes the event loop, which removes
        # it, so it also covers the after_serving functions: Outbox.close hands
        # back the leases there.
        loop.add_signal_handler(signal.SIGTERM, handler)


class _SigtermHandler:
    def __init__(
        self, loop: asyncio.AbstractEventLoop, main_process: BaseProcess
    ) -> None:
        self.loop = loop
        self.main_process = main_process
        self.ignored = 0

    def __call__(self) -> None:
        if not self.main_process.is_alive():
            # Nothing sets the shutdown event any more, so exit on SIGTERM as
            # the worker would have without this handler.
            self.loop.remove_signal_handler(signal.SIGTERM)
            signal.raise_signal(signal.SIGTERM)
            return

        # With hypercorn's default `daemon = true` the main process sends
        # SIGTERM twice: once after the first worker exits, and again when it
        # exits itself. One warning is enough.
        self.ignored += 1
        if self.ignored > 1:
            logger.debug("SIGTERM ignored again, %d times so far", self.ignored)
            return
        logger.warning(
            "SIGTERM ignored in hypercorn worker %d while its main process %d "
            "runs. The main process sets a shared shutdown event before it sends "
            "SIGTERM to its workers, so this worker finishes its graceful shutdown "
            "instead of being cut off. To stop the workers, send SIGTERM to "
            "process %d, which stops them all.",
            os.getpid(),
            self.main_process.pid,
            self.main_process.pid,
        )


def _is_hypercorn_worker() -> bool:
    # Quart imports hypercorn, so "hypercorn" in sys.modules is true under any
    # server. The function that the process runs identifies hypercorn's workers:
    # hypercorn.asyncio.run.asyncio_worker or uvloop_worker. `_target` is
    # private to multiprocessing, and no public attribute contains it.
    target = getattr(multiprocessing.current_process(), "_target", None)
    return getattr(target, "__module__", "").startswith("hypercorn.")
