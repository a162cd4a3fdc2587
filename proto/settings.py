"""Connection settings shared by every role, read from the environment in one place."""

from __future__ import annotations

import os

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"  # local development default only
AMQP_URL_ENV = "DINET_AMQP_URL"


def amqp_url_from_env(explicit: str | None = None) -> str:
    """The AMQP URL: an explicit value (CLI flag) wins, then ``DINET_AMQP_URL``, then the local default."""
    if explicit:
        return explicit
    return os.environ.get(AMQP_URL_ENV) or DEFAULT_AMQP_URL
