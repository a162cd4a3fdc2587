"""Process hygiene for hivemind's DHT child, shared by the long-running roles.

hivemind runs each DHT in a child process forked (without exec) from the role's. Starting it:
:func:`fork_dht` keeps the child's garbage collector away from the parent's objects and bounds the
wait for it. Stopping: when a supervisor signals the whole process group (systemd's default, or
Ctrl-C in a terminal), that child receives the signal too and can hang; Python's exit handler would
then wait for it forever after the role has already shut down cleanly. Roles call
:func:`reap_children` once their own shutdown is done.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import multiprocessing
import threading
import time
from typing import Any, NoReturn

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 60.0  # a DHT child must be ready within this (about half a second on an idle machine)
_LAST_WORD_S = 1.0  # how long a dead child's own start error may take to reach this process
_FORK_LOCK = threading.Lock()  # gc.freeze/unfreeze are process-wide


class DhtStartError(RuntimeError):
    """hivemind's DHT child died before it was ready and said nothing about why (a crash, a kill)."""


class DhtStartTimeout(DhtStartError, TimeoutError):
    """hivemind's DHT child is alive but was not ready in time (stuck); the caller should shut it down."""


def reap_children(timeout_s: float = 2.0) -> None:
    """Join child processes that are still alive after shutdown; kill the ones that do not exit."""
    for child in multiprocessing.active_children():
        child.join(timeout_s)
        if child.is_alive():
            logger.warning("child process %s (pid %s) did not exit; killing it", child.name, child.pid)
            child.kill()
            child.join(timeout_s)


def fork_dht(dht: Any, *, timeout_s: float = START_TIMEOUT_S) -> None:
    """Fork ``dht`` (a ``hivemind.DHT`` built with ``start=False``) with this process's heap frozen; wait until ready.

    hivemind forks without exec. Objects that were already garbage here (reference cycles the collector had
    not reached yet: gRPC calls and channels of earlier requests, their exceptions and frames) are copied
    into the child, and the child's collector would finalize them there, calling into gRPC, whose state a
    fork does not carry over (gRPC skips its fork handlers while its threads are busy): the child died of
    SIGSEGV ("Garbage-collecting" in its traceback), and every lookup through it timed out. ``gc.freeze()``
    moves every object of this process out of the collector's reach for the fork, so the child never frees
    one; this process unfreezes at once and collects its garbage itself.

    An error the child reports itself (hivemind's, e.g. ``P2PDaemonError`` for unreachable bootstrap peers or a
    malformed multiaddr) is raised here unchanged, as ``hivemind.DHT(start=True)`` raised it.

    :raises DhtStartError: the child died before it was ready without reporting an error (a ``RuntimeError``).
    :raises DhtStartTimeout: it was alive but not ready within ``timeout_s`` (also a ``TimeoutError``); it is
        still running, and the caller shuts it down.
    """
    with _FORK_LOCK:
        gc.freeze()
        try:
            dht.start()
        finally:
            gc.unfreeze()
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            dht.wait_until_ready(timeout=0.25)
            return
        except TimeoutError:
            if not dht.is_alive():
                _raise_last_word(dht)
            if time.monotonic() > deadline:
                raise DhtStartTimeout(f"the DHT process was not ready within {timeout_s:g} s") from None


def _raise_last_word(dht: Any) -> NoReturn:
    """Raise the error a dead child reported before it exited, else :class:`DhtStartError`.

    A child that fails to start reports its error and then exits; the report travels through a pipe that a
    thread of this process reads, so the exit can be seen before the report has arrived.
    """
    with contextlib.suppress(TimeoutError):  # a timeout: it said nothing (a crash or a kill)
        dht.wait_until_ready(timeout=_LAST_WORD_S)
    raise DhtStartError(f"the DHT process died while starting (exit code {dht.exitcode})") from None
