"""Spans of the cache's own Redis work, emitted after the fact.

The read and write paths measure their Redis steps anyway (for the latency histograms); when
the cache was given a tracer (:func:`.otel.instrument`), each step also becomes a span with
the measured duration, ending now, as a child of the current span. Built after the fact, a
span costs nothing to a cache that was never instrumented (the callers check for a tracer
first), and needs no ``with`` block around code that returns from many places.
"""

from __future__ import annotations

import time
from typing import Any


def record_span(tracer: Any, name: str, model: str, seconds: float, **attributes: Any) -> None:
    """A span ``name`` of ``seconds``, ending now: ``writethrough.model`` and
    ``db.system.name`` attributes, plus ``attributes`` prefixed with ``writethrough.``."""
    end = time.time_ns()
    attrs: dict[str, Any] = {"writethrough.model": model, "db.system.name": "redis"}
    for key, value in attributes.items():
        attrs[f"writethrough.{key}"] = value
    span = tracer.start_span(name, start_time=end - int(seconds * 1e9), attributes=attrs)
    span.end(end_time=end)
