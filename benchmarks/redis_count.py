"""A redis-py client that counts round trips (the same idea as ``tests/_servers.counting_redis``).

Each ``send_packed_command`` is one round trip: one command, one pipeline or one script call.
The connection handshake (HELLO, CLIENT SETINFO, SELECT...) is not counted: it happens once per
pooled connection, not per operation.
"""

from __future__ import annotations

from typing import Any

import redis
import redis.connection


class RoundTripCounter:
    """How many requests went to Redis since the last :meth:`reset`."""

    def __init__(self) -> None:
        self.count = 0

    def reset(self) -> None:
        self.count = 0


def counting_redis(url: str, **kwargs: Any) -> tuple[redis.Redis, RoundTripCounter]:
    """A client on ``url`` whose connections count round trips, and its counter."""
    counter = RoundTripCounter()
    # the URL's own kind (rediss: TLS, unix: a socket file), which connection_class replaces
    base = redis.ConnectionPool.from_url(url).connection_class

    class CountingConnection(base):  # type: ignore[valid-type,misc]
        _handshake_depth = 0

        def on_connect(self) -> None:
            self._handshake_depth += 1
            try:
                super().on_connect()
            finally:
                self._handshake_depth -= 1

        if hasattr(base, "on_connect_check_health"):

            def on_connect_check_health(self, check_health: bool = True) -> None:
                self._handshake_depth += 1
                try:
                    super().on_connect_check_health(check_health=check_health)
                finally:
                    self._handshake_depth -= 1

        def send_packed_command(self, command: Any, check_health: bool = True) -> None:
            if not self._handshake_depth:
                counter.count += 1
            super().send_packed_command(command, check_health=check_health)

    client = redis.Redis.from_url(url, connection_class=CountingConnection, **kwargs)
    return client, counter
