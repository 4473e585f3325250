"""The package's own random numbers (an entry's TTL jitter, the near cache's first node,
``verify()``'s sample of keys), never drawn from the ``random`` module's shared generator: an
application or a test suite that seeds it (``random.seed(n)`` for reproducible data) would
see its sequence shifted by every commit of a cached row.

Reseeded in a forked child, as the ``random`` module's own generator is: two processes of a
pre-forking server do not draw the same jitters."""

from __future__ import annotations

import os
import random as _random

#: the generator; its methods are thread-safe as the ``random`` module's are
generator = _random.Random()

if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=generator.seed)

#: a float in [0.0, 1.0)
random = generator.random
randrange = generator.randrange
randint = generator.randint
