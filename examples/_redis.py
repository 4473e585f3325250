"""Find a Redis server for the examples, starting a throwaway one if needed.

The examples should run with no setup on any machine that has Redis installed, without
touching a Redis the user already runs elsewhere and without leaving a server behind.
Only redis-py and the standard library are used.
"""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import redis

DEFAULT_URL = "redis://127.0.0.1:6379/0"
#: Set to 1 to skip REDIS_URL and the default server (used to test the spawn path).
FORCE_SPAWN_ENV = "WRITETHROUGH_EXAMPLE_FORCE_SPAWN"

HOW_TO_GET_REDIS = """\
No Redis server found for the example.
Tried $REDIS_URL, redis://127.0.0.1:6379 and a `redis-server` binary on PATH.

Any one of these will do:
  * Debian/Ubuntu:  sudo apt-get install redis-server
  * macOS:          brew install redis
  * Docker:         docker run --rm -p 6379:6379 redis:7
  * or point the example at a server you have:  REDIS_URL=redis://host:6379/0
"""


def why_not_answering(url: str, timeout: float = 1.0) -> str | None:
    """None if the Redis server at ``url`` answers PING within ``timeout`` seconds, else what
    went wrong (the error and the server's own message)."""
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
    except ValueError as exc:  # not a Redis URL
        return f"{type(exc).__name__}: {exc}"
    try:
        client.ping()
    except (redis.RedisError, OSError) as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        client.close()
    return None


def _answers(url: str, timeout: float = 1.0) -> bool:
    return why_not_answering(url, timeout) is None


def _free_loopback_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Terminate the throwaway server at interpreter exit; kill it if it lingers."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _tail(path: str, lines: int = 5) -> str:
    """The last lines of the server's log, to explain a failed start."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return " | ".join(f.read().strip().splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _spawn(binary: str, attempts: int = 3) -> str:
    """Start ``redis-server`` on a free loopback port, wait until it answers, return its URL."""
    workdir = tempfile.mkdtemp(prefix="writethrough-example-redis-")
    atexit.register(shutil.rmtree, workdir, ignore_errors=True)
    last_error = ""
    for _ in range(attempts):  # the free port may be taken between picking and binding
        port = _free_loopback_port()
        url = f"redis://127.0.0.1:{port}/0"
        logfile = os.path.join(workdir, f"redis-{port}.log")
        proc = subprocess.Popen(
            [
                binary,
                "--port", str(port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--dir", workdir,
                "--logfile", logfile,
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        atexit.register(_stop, proc)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                last_error = f"redis-server exited with code {proc.returncode}: {_tail(logfile)}"
                break
            if _answers(url, timeout=0.5):
                print(f"[example] started a throwaway redis-server at {url}", file=sys.stderr)
                return url
            time.sleep(0.05)
        else:
            _stop(proc)
            last_error = "redis-server did not answer PING within 10 s"
    sys.exit(f"Could not start a throwaway redis-server ({binary}): {last_error}")


def redis_url_or_start() -> str:
    """Return a Redis URL for the examples.

    In order: ``$REDIS_URL``; the default local server if it answers PING; a throwaway
    ``redis-server`` on a free loopback port (stopped at interpreter exit). Exits with
    instructions when none of these is possible. ``WRITETHROUGH_EXAMPLE_FORCE_SPAWN=1``
    skips the first two.
    """
    force_spawn = os.environ.get(FORCE_SPAWN_ENV, "") not in ("", "0")
    if not force_spawn:
        env_url = os.environ.get("REDIS_URL")
        if env_url:
            return env_url
        if _answers(DEFAULT_URL):
            return DEFAULT_URL
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit(HOW_TO_GET_REDIS)
    return _spawn(binary)


if __name__ == "__main__":
    print(redis_url_or_start())
