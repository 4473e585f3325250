"""pytest plugin for ``run.py --dburi``: names each per-worker database as it is created.

SQLAlchemy's pytest plugin creates one database per pytest-xdist worker (its "follower") in
the controlling process, and drops it when the worker finishes. A run that is stopped before
a worker finishes leaves that database behind, and the suite's own ``--write-idents`` only
names it once the worker has started. This hook appends the name to the file given by
``--wt-followers`` right after SQLAlchemy created it, so ``run.py`` can always drop it.
"""

from __future__ import annotations

from typing import Any

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--wt-followers", default=None, help="file to list per-worker databases in")


@pytest.hookimpl(optionalhook=True, trylast=True)
def pytest_configure_node(node: Any) -> None:
    """After SQLAlchemy's own ``pytest_configure_node``, which chose and created the name."""
    path = node.config.getoption("--wt-followers")
    ident = node.workerinput.get("follower_ident")
    if path and ident:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(f"{ident}\n")
