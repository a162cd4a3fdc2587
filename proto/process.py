"""Process-exit hygiene shared by the long-running roles.

hivemind runs each DHT in a child process. When a supervisor signals the whole process
group (systemd's default, or Ctrl-C in a terminal), that child receives the signal too and
can hang; Python's exit handler would then wait for it forever after the role has already
shut down cleanly. Roles call :func:`reap_children` once their own shutdown is done.
"""

from __future__ import annotations

import logging
import multiprocessing

logger = logging.getLogger(__name__)


def reap_children(timeout_s: float = 2.0) -> None:
    """Join child processes that are still alive after shutdown; kill the ones that do not exit."""
    for child in multiprocessing.active_children():
        child.join(timeout_s)
        if child.is_alive():
            logger.warning("child process %s (pid %s) did not exit; killing it", child.name, child.pid)
            child.kill()
            child.join(timeout_s)
