"""A ``TypeDecorator`` whose ``process_bind_param`` does more than convert a value.

fastapi-storages' ``FileType`` (which sqladmin's file uploads use) saves the upload to its
storage in ``process_bind_param`` and closes the upload's file, returning the name to store.
To learn what the database stored, a commit runs the type's ``process_bind_param`` on the
committed value once more: on an upload already saved and closed it raises. That error
failed the user's flush (found by sqladmin's suite with the extension: "I/O operation on
closed file"). A commit must never fail because of the cache: the row's entry is left a miss
instead, the column named in a warning, and the upload was saved exactly once.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from sqlalchemy import String
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from sqlalchemy.types import TypeDecorator

from sqlalchemy_writethrough import CachedModel, WriteThroughCache, WriteThroughWarning

from _cache_helpers import entry_key, entry_state
from _servers import capture_sql, reset_schema

#: what the storage saved: name -> content
STORAGE: dict[str, bytes] = {}


class Upload:
    """An uploaded file, as a web framework hands it over (a name and an open file)."""

    def __init__(self, filename: str, content: bytes) -> None:
        self.filename = filename
        self.file = io.BytesIO(content)


class FileType(TypeDecorator[Any]):
    """Saves an upload and stores its name; a name (a loaded value) is stored as it is."""

    impl = String(100)
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Any) -> Any:
        if value is None or isinstance(value, str):
            return value
        STORAGE[value.filename] = value.file.read()  # raises once the file is closed
        value.file.close()
        return value.filename


class Base(DeclarativeBase):
    pass


class TsDocument(Base, CachedModel):
    __tablename__ = "ts_document"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    title: Mapped[str] = mapped_column(String(50))
    file: Mapped[Any] = mapped_column(FileType())


@pytest.fixture
def factory(engine: Engine, redis_url: str, prefix: str) -> Iterator[sessionmaker[Session]]:
    reset_schema(engine, Base.metadata)
    STORAGE.clear()
    cache = WriteThroughCache(redis_url, prefix=prefix)
    maker = sessionmaker(engine, info={"cache": cache})
    cache.install(maker)
    yield maker
    cache.close()


def test_a_commit_whose_bind_processing_saved_an_upload_succeeds(
    factory: sessionmaker[Session], engine: Engine, redis_client: redis.Redis
) -> None:
    cache: WriteThroughCache = factory.kw["info"]["cache"]
    key = entry_key(cache, TsDocument, 1)
    said = r"TsDocument\.file.*process_bind_param"
    with pytest.warns(WriteThroughWarning, match=said), factory() as s:
        s.add(TsDocument(id=1, title="report", file=Upload("report.txt", b"abc")))
        s.commit()
    assert STORAGE == {"report.txt": b"abc"}  # saved once
    assert entry_state(redis_client, key) is None  # a miss, not a guess

    with factory() as s:  # loaded from the database, then filled: a name binds as itself
        doc = s.get(TsDocument, 1)
        assert doc is not None and doc.file == "report.txt"
    assert entry_state(redis_client, key) == "value"
    with factory() as s, capture_sql(engine) as sql:
        doc = s.get(TsDocument, 1)
        assert doc is not None and doc.file == "report.txt" and sql == []

    with factory() as s:  # a new upload over a cached row
        doc = s.get(TsDocument, 1)
        assert doc is not None
        doc.file = Upload("v2.txt", b"def")
        s.commit()
    assert STORAGE == {"report.txt": b"abc", "v2.txt": b"def"}
    assert entry_state(redis_client, key) is None
    with factory() as s:
        doc = s.get(TsDocument, 1)
        assert doc is not None and doc.file == "v2.txt"
