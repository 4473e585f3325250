"""A stress checker for sqlalchemy-writethrough: many processes, real servers, injected faults.

``python -m stress --help`` runs it. The pieces, each usable on its own:

* :mod:`stress.models`   the cached models the workers hammer (a few hot rows);
* :mod:`stress.worker`   one worker process: its own engine, cache and session factory, a random
  mix of reads and writes, every read and commit appended to its own history file;
* :mod:`stress.history`  the history recorder (one JSON line per event, flushed at once) and loader;
* :mod:`stress.checker`  a pure function from histories plus the final database and Redis
  contents to a list of violations;
* :mod:`stress.redis_server`, :mod:`stress.proxy`, :mod:`stress.faults`  a throwaway
  ``redis-server``, a loopback TCP proxy that delays, stalls, drops and black-holes traffic, and
  the schedule that injects faults during a run;
* :mod:`stress.runner`   a run (and the herd, outage and partition scenarios) end to end.

Everything listens and connects on 127.0.0.1 only, every loop has a deadline, and every process
or server started here is stopped on exit.
"""
