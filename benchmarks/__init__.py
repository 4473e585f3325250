"""Benchmarks of sqlalchemy-writethrough against the Redis floor, plain PostgreSQL and peers.

Run ``python -m benchmarks`` (full run, a few minutes on 2 cores; writes
``benchmarks/results/latest.md`` and ``latest.png``) or ``python -m benchmarks --quick`` (a
smoke run: a few rounds of every row). ``nox -s bench`` installs matplotlib and the peers
first. See ``python -m benchmarks --help``.
"""
