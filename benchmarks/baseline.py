"""Another version of the library, measured in the same process as this one (``--baseline``).

A before/after comparison made of two runs on a shared, loaded machine compares two different
machines. ``python -m benchmarks --baseline DIR`` loads the ``sqlalchemy_writethrough`` package
found in ``DIR`` (for example a commit's, ``git archive <commit> sqlalchemy_writethrough | tar -x
-C DIR``) under another module name, gives it its own cache on its own key prefix over the same
Redis, tables and models, and adds a ``baseline`` row beside each of our rows, interleaved with
them like every other row.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

#: the module name the baseline package is loaded under
MODULE = "sqlalchemy_writethrough_baseline"


def load(directory: Path) -> ModuleType:
    """The ``sqlalchemy_writethrough`` package under ``directory``, imported as :data:`MODULE`
    (its modules import one another relatively, so the copy is self-contained)."""
    init = directory / "sqlalchemy_writethrough" / "__init__.py"
    if not init.is_file():
        raise SystemExit(f"--baseline: no sqlalchemy_writethrough package in {directory}")
    loaded = sys.modules.get(MODULE)
    if loaded is not None:
        return loaded
    spec = importlib.util.spec_from_file_location(
        MODULE, init, submodule_search_locations=[str(init.parent)]
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[MODULE] = module
    spec.loader.exec_module(module)
    return module


def describe(directory: Path) -> str:
    """What the baseline is: the commit its directory names, when it says (``git archive``
    leaves none), else the directory."""
    marker = directory / "COMMIT"
    if marker.is_file():
        return f"{marker.read_text().strip()} ({directory})"
    return str(directory)
