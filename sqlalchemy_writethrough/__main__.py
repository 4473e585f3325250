"""``python -m sqlalchemy_writethrough``: the command-line tool (see :mod:`.cli`)."""

from __future__ import annotations

import sys

from .cli import main

sys.exit(main())
