"""Histories: one JSON object per line, one file per worker process, flushed after every event.

A line is written (and handed to the OS) before the next operation starts, so a worker killed
with SIGKILL loses nothing it had recorded. Times are ``time.monotonic_ns()``: every process runs
on this one machine, so CLOCK_MONOTONIC is shared and times from different workers compare.

Events (``"e"`` is the kind; ``"w"`` the worker id, added by the recorder: one process with one
``WriteThroughCache``, so one near cache; a respawned worker has a new id):

``read``     ``tb`` table, ``id``, ``v`` value seen (None: no such row), ``src`` "cache" | "db" |
             "locked" (a ``FOR UPDATE`` read) | "near" (a near-cache copy), ``t0``/``t1`` start
             and end, ``iso`` isolation level, ``tx`` when this transaction's database
             connection began (None: not yet); an IN-list read logs one per id asked for, with
             the batch's times, ``batch`` how many ids and ``q`` "select" | "query" (legacy)
``cstart``   a commit is about to be attempted: ``tx`` id, ``writes`` [[table, id, value|None]]
             (None: the row is deleted), ``t``
``cend``     its outcome: ``ok`` | ``failed`` (certainly not committed) | ``maybe``, ``t``, and
             ``lf`` the cache's lock failures during the transaction (degrade mode journals them)
``kill``     the worker is about to SIGKILL itself: ``where`` "after_flush" (before the database
             COMMIT) or "after_commit" (after COMMIT, before the cache publishes), ``tx``, ``t``
``aborted``  values written then rolled back (explicit rollback, savepoint rollback): ``writes``
``published`` (``--publish background``) the cache's background worker wrote the publishes of
             the commits ``txs``, at ``t`` (a commit with none published it before its
             ``cend``, or never, if its worker died first)
``evicted``  (``--faults evict``, written by the runner's listener, ``w`` "redis") Redis evicted
             ``key``; ``t`` when the run heard of it
``op``       an operation finished: ``k`` kind, ``t0``/``t1``, ``ok``, ``err`` (a user-visible
             exception, as text)

With ``--tenants``, every event of an operation also carries ``tn``, the tenant (schema) it
reached, and ``way``, how it chose it (``bind``, ``maker``, ``connection``, ``execute``,
``statement``; see :mod:`stress.worker`); the seed of each schema carries its ``tn``.

With ``--model-versions 2``, every event of a worker that maps the tables with the second model
version (see :mod:`stress.models`) carries ``mv`` "B"; version A's events have no ``mv``.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def now() -> int:
    return time.monotonic_ns()


class Recorder:
    """Appends events to one worker's history file."""

    def __init__(self, path: Path | str, worker: str) -> None:
        self.worker = worker
        #: the current operation's tenant and way (``--tenants``), added to every event
        self.tenant: str | None = None
        self.way: str | None = None
        #: the worker's model version when not the first (``--model-versions``), added to
        #: every event as ``mv``
        self.model_version: str | None = None
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        #: the cache's background publisher logs from its own thread (``published``)
        self._lock = threading.Lock()

    def log(self, event: dict[str, Any]) -> None:
        event["w"] = self.worker
        if self.model_version is not None:
            event["mv"] = self.model_version
        if self.tenant is not None:
            event.setdefault("tn", self.tenant)
            if self.way is not None:
                event.setdefault("way", self.way)
        line = json.dumps(event, separators=(",", ":")) + "\n"
        with self._lock:
            self._file.write(line)
            self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_histories(directory: Path | str) -> list[dict[str, Any]]:
    """Every event of every ``*.jsonl`` file in ``directory``.

    A torn last line (a worker killed in the middle of a write) is skipped.
    """
    events: list[dict[str, Any]] = []
    for path in sorted(Path(directory).glob("*.jsonl")):
        events.extend(_lines(path))
    return events


def _lines(path: Path) -> Iterator[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.endswith("\n"):
                return
            try:
                yield json.loads(line)
            except ValueError:
                continue
