"""pytest plugin for SQLAlchemy's own test suite: every ``Session`` runs with the extension.

Loaded with ``-p wt_suite_plugin`` (this folder on ``PYTHONPATH``) by ``run.py``. For each test
it makes a :class:`WriteThroughCache` on $REDIS_URL (default ``redis://127.0.0.1:6379/0``)
under a fresh key prefix, installs it on :class:`sqlalchemy.orm.Session` itself (so every
session of every test is covered) and caches every mapped class with ``register_all()``;
afterwards it uninstalls the cache and deletes the prefix's keys. ``install()`` gives a
``sessionmaker`` a Session subclass whose ``get()`` asks the cache before SQLAlchemy builds a
statement; the suite makes its sessions from ``Session`` itself, so for the run the plugin
routes ``Session.get`` through the same function that subclass calls
(``sqlalchemy_writethrough.session.get_through``): only this harness replaces a SQLAlchemy
method, so that the suite exercises that path too. The suite recreates tables
and loads fixture rows with Core between tests: a fresh namespace per test keeps entries of
one test from answering another's loads. A model the cache cannot keep exact (a class mapped
to a join, a concrete union base...) is left out by ``register_all()`` itself, with its
``WriteThroughWarning``.

With ``WT_SUITE_ASYNCIO=1`` (``run.py --asyncio-flavour``, for ``test/ext/asyncio``) the cache is
built from the URL and installed on ``AsyncSession`` instead of ``Session``: every AsyncSession
then runs the cache's asyncio flavour (``redis.asyncio`` awaited inside SQLAlchemy's greenlet,
the Session subclass ``install()`` gives an async target), the path users of asyncio take; the
few plain ``Session`` tests of that folder run without the cache. Each test's cache is closed
with ``aclose()`` on the suite's own event loop (one per process), where its connections live.

It never fails a test by itself: if Redis cannot be reached or the cache cannot be set up, it
says so loudly, runs the tests without the extension and writes the reason to the file named
by ``--wt-status``, which ``run.py`` checks (a pass without the extension proves nothing).
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

#: set when the extension could not be installed for at least one test
_problems: list[str] = []
_client: Any = None
_url = ""
#: [tests run with the cache installed, those of them whose sessions read or wrote through it]
_used = [0, 0]
#: the read path of the current test's cache, which Session.get asks first (see above)
_read: Any = None


#: models register_all() refused, with the reason (reported, then skipped)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--wt-status",
        default=None,
        help="file to write 'ok' or the reason the extension was not active (sqlalchemy_suite)",
    )


def _quiet_configuration_notices() -> None:
    """The suite's own warning assertions (``expect_warnings``) patch ``warnings.warn`` and fail
    a test on any warning they did not expect. The cache's WriteThroughWarnings (a model
    ``register_all()`` leaves out, a column that invalidates) are notices about this harness's
    ``register_all()`` over every mapping, not about the test: here they are dropped (the
    first kind is logged as well). Only the harness does this, to the package's own modules."""
    import types
    import warnings

    from sqlalchemy_writethrough import WriteThroughWarning
    from sqlalchemy_writethrough import cache as cache_module
    from sqlalchemy_writethrough import model as model_module
    from sqlalchemy_writethrough import registry as registry_module

    def warn(message: Any, category: Any = None, stacklevel: int = 1, **kw: Any) -> None:
        if isinstance(category, type) and issubclass(category, WriteThroughWarning):
            return
        warnings.warn(message, category, stacklevel + 1, **kw)

    # (the models' notices moved from cache.py to registry.py with the backend refactor)
    for module in (cache_module, model_module, registry_module):
        module.warnings = types.SimpleNamespace(warn=warn)  # type: ignore[attr-defined]


def pytest_configure(config: pytest.Config) -> None:
    global _client
    _quiet_configuration_notices()
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    global _url
    url = _url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    try:
        client = redis.Redis.from_url(
            url, socket_timeout=2, socket_connect_timeout=2, retry=Retry(NoBackoff(), 1)
        )
        client.ping()
    except Exception as exc:  # no Redis: run the suite, but say it loudly
        _problems.append(f"Redis at {url} is unreachable ({exc!r})")
        return
    _client = client
    _route_session_get()


def _route_session_get() -> None:
    from sqlalchemy.orm import Session

    from sqlalchemy_writethrough.session import get_through

    plain_get = Session.get

    def get(self: Session, entity: Any, ident: Any, **kw: Any) -> Any:
        return get_through(_read, self, entity, ident, kw, lambda *a, **k: plain_get(self, *a, **k))

    Session.get = get  # type: ignore[method-assign]


#: WT_SUITE_NEAR_CACHE=1: every test's cache has a near cache too (hits from process memory)
_NEAR_CACHE = os.environ.get("WT_SUITE_NEAR_CACHE", "") not in ("", "0")
#: SQLAlchemy's own pytest plugin, by the names its bootstrap and an import give it: its suite
#: runs every async test on one event loop of its own
_SQLALCHEMY_SUITE = frozenset({"sqla_pytestplugin", "sqlalchemy.testing.plugin.pytestplugin"})
#: WT_SUITE_ASYNCIO=1: the cache goes on AsyncSession, through its asyncio flavour (see above)
_ASYNCIO = os.environ.get("WT_SUITE_ASYNCIO", "") not in ("", "0")


def _wait_until_serving(cache: Any, timeout: float = 5.0) -> None:
    """A near cache serves nothing until its subscription is confirmed: wait for that, so
    that the test's repeated reads can be served from memory."""
    near = cache._near
    deadline = time.monotonic() + timeout
    while not near.serving():
        if time.monotonic() > deadline:
            _problems.append("a near cache's subscription was not confirmed within 5 s")
            return
        time.sleep(0.002)


#: registries alive after the last gc.collect(), plus the growth that triggers the next one
_collect_above = [0]


def _collect_dead_mappers() -> None:
    """``register_all()`` builds a layout for every mapper still in memory, and a test's own
    models are garbage only once the cyclic collector has run: a suite that maps its models
    in each test (sqlalchemy-utils', Flask-SQLAlchemy's) and clears nothing would have each
    test's cache hold the earlier tests' mappers, which then never die (every test slower
    than the last). SQLAlchemy's suite clears its mappers itself: with few registries alive,
    nothing is collected here."""
    import gc

    from sqlalchemy.orm import mapperlib

    if len(mapperlib._mapper_registries) > _collect_above[0]:
        gc.collect()
        _collect_above[0] = len(mapperlib._mapper_registries) + 20


def _delete_prefix(prefix: str) -> None:
    keys = list(_client.scan_iter(match=f"{prefix}:*", count=1000))
    if keys:
        _client.unlink(*keys)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    global _read
    if _client is None:
        yield
        return
    from sqlalchemy import event
    from sqlalchemy.orm import Mapper, Session

    from sqlalchemy_writethrough import cache as cache_module
    from sqlalchemy_writethrough import engine_events

    # tests of mapper events clear every MapperEvents and InstrumentationEvents listener, the
    # package's own mapper_configured check and class_uninstrument hook among them: put them
    # back, as a fresh process would have them
    if not event.contains(Mapper, "mapper_configured", cache_module._on_mapper_configured):
        event.listen(Mapper, "mapper_configured", cache_module._on_mapper_configured)
    if not event.contains(object, "class_uninstrument", cache_module._on_class_uninstrument):
        event.listen(object, "class_uninstrument", cache_module._on_class_uninstrument)
    # and tests of engine events clear the Engine class's (the cache's statement tracking)
    engine_events.listen()
    _collect_dead_mappers()
    prefix = f"wtsuite-{uuid.uuid4().hex[:12]}"
    cache = None
    target: Any = Session
    try:
        from sqlalchemy_writethrough import WriteThroughCache

        # no shared stats: a send after the test would leave its prefix's stats behind
        cache = WriteThroughCache(
            _url if _ASYNCIO else _client,
            prefix=prefix,
            stats_interval=None,
            near_cache=_NEAR_CACHE,
        )
        if _ASYNCIO:
            from sqlalchemy.ext.asyncio import AsyncSession

            target = AsyncSession
        cache.install(target)
        cache.register_all()
        _read = None if _ASYNCIO else cache._read
        if _NEAR_CACHE:
            _wait_until_serving(cache)
    except Exception as exc:
        _problems.append(f"{item.nodeid}: the cache could not be installed ({exc!r})")
        if cache is not None:
            cache.uninstall(target)
        cache = None
    try:
        yield
    finally:
        _read = None
        if cache is not None:
            stats = cache.stats()
            _used[0] += 1
            _used[1] += bool(stats.hits or stats.misses or stats.commits)
            cache.uninstall(target)
            if _ASYNCIO and _SQLALCHEMY_SUITE.intersection(sys.modules):
                from sqlalchemy.testing import asyncio as suite_asyncio

                # on SQLAlchemy's suite's event loop, where the client's connections live
                suite_asyncio._run_coroutine_function(cache.aclose)
            elif _ASYNCIO or _NEAR_CACHE:
                # another project's suite, whose loop per test (pytest-asyncio, anyio) is over
                # by now: close() closes the connections of loops that are over (and the near
                # cache's subscriber thread)
                cache.close()
            # the cache validates every mapper configured while it lives: a later test's
            # mappers are none of its business (it would be collected only at the next gc)
            cache_module._caches.discard(cache)
            try:
                _delete_prefix(prefix)
            except Exception as exc:
                _problems.append(f"{item.nodeid}: keys under {prefix} not deleted ({exc!r})")


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _problems:
        terminalreporter.write_sep("!", "sqlalchemy-writethrough was NOT active everywhere")
        for line in _problems[:20]:
            terminalreporter.write_line(line)
    else:
        where = "AsyncSession (its asyncio flavour)" if _ASYNCIO else "Session"
        terminalreporter.write_sep("-", f"sqlalchemy-writethrough installed on every {where}")


def pytest_sessionfinish(session: pytest.Session) -> None:
    # Here, not at unconfigure: a pytest-xdist worker tells the controller it has finished
    # right after this hook, and the controller may end it before its unconfigure runs (the
    # last worker's line was missing, and with it the count of its tests that used the cache)
    path = session.config.getoption("--wt-status", None)
    if path:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write("".join(f"{line}\n" for line in _problems) if _problems else "ok\n")
            # (per pytest-xdist worker: run.py adds them up)
            fh.write(f"used {_used[1]} {_used[0]}\n")
