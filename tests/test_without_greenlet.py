"""A sync-only application needs no greenlet: SQLAlchemy 2.1 no longer installs it, and a
fresh install of the library with a sync driver has none. Run in a subprocess where importing
greenlet fails, as it does when it is not installed."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

SCRIPT = """
import sys
sys.modules["greenlet"] = None  # importing it now fails, as when it is not installed
from sqlalchemy import String, create_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker
from sqlalchemy_writethrough import CachedModel, WriteThroughCache

class Base(DeclarativeBase):
    pass

class NgItem(CachedModel, Base):
    __tablename__ = "ng_item"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(20))

engine = create_engine("sqlite:///" + sys.argv[1])
Base.metadata.create_all(engine)
Session = sessionmaker(engine)
cache = WriteThroughCache(sys.argv[2], prefix=sys.argv[3], stats_interval=None)
cache.install(Session)
with Session() as s:
    s.add(NgItem(id=1, name="a"))
    s.commit()
with Session() as s:
    print(s.get(NgItem, 1).name, cache.stats().hits)
cache.clear()
"""


def test_a_sync_application_runs_without_greenlet(tmp_path: Path, redis_url: str) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            SCRIPT,
            str(tmp_path / "app.db"),
            redis_url,
            f"t-ng-{uuid.uuid4().hex[:8]}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["a", "1"]
