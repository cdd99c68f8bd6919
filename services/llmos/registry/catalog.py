"""The model catalog, persisted in SQLite: one row per name and tag."""

from __future__ import annotations

import dataclasses
import sqlite3
import threading
from dataclasses import dataclass

from llmos.common.names import ModelRef


@dataclass(frozen=True)
class ModelRecord:
    name: str
    tag: str
    digest: str
    source_format: str      # "safetensors" or "gguf"
    source: str
    path: str               # directory in the model store
    architecture: str
    parameter_count: int
    dtype: str
    context_length: int
    has_chat_template: bool
    create_time: float
    estimated_bytes: int
    measured_bytes: int = 0
    # Seconds idle before it is unloaded; None: the registry's default; negative: never.
    keep_alive: float | None = None

    @property
    def ref(self) -> ModelRef:
        return ModelRef(self.name, self.tag)


_FIELDS = [f.name for f in dataclasses.fields(ModelRecord)]


class Catalog:
    """Name and tag → model record. Thread-safe; every write is one transaction."""

    def __init__(self, db_path: str) -> None:
        self._lock = threading.Lock()
        self._db = sqlite3.connect(db_path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS models (name TEXT NOT NULL, tag TEXT NOT NULL, "
            "digest TEXT NOT NULL, source_format TEXT NOT NULL, source TEXT NOT NULL, "
            "path TEXT NOT NULL, architecture TEXT NOT NULL, parameter_count INTEGER NOT NULL, "
            "dtype TEXT NOT NULL, context_length INTEGER NOT NULL, has_chat_template INTEGER NOT NULL, "
            "create_time REAL NOT NULL, estimated_bytes INTEGER NOT NULL, "
            "measured_bytes INTEGER NOT NULL DEFAULT 0, keep_alive REAL, PRIMARY KEY (name, tag))")
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(models)")}
        for column, kind in (("measured_bytes", "INTEGER NOT NULL DEFAULT 0"), ("keep_alive", "REAL")):
            if column not in columns:
                self._db.execute(f"ALTER TABLE models ADD COLUMN {column} {kind}")

    def close(self) -> None:
        self._db.close()

    def get(self, ref: ModelRef) -> ModelRecord | None:
        with self._lock:
            row = self._db.execute(f"SELECT {', '.join(_FIELDS)} FROM models WHERE name=? AND tag=?",
                                   (ref.name, ref.tag)).fetchone()
        return self._record(row) if row else None

    def put(self, record: ModelRecord) -> None:
        values = dataclasses.astuple(record)
        with self._lock:
            self._db.execute(f"INSERT OR REPLACE INTO models ({', '.join(_FIELDS)}) "
                             f"VALUES ({', '.join('?' * len(_FIELDS))})", values)

    def set_measured(self, ref: ModelRef, nbytes: int) -> None:
        with self._lock:
            self._db.execute("UPDATE models SET measured_bytes=? WHERE name=? AND tag=?",
                             (nbytes, ref.name, ref.tag))

    def set_keep_alive(self, ref: ModelRef, seconds: float) -> None:
        with self._lock:
            self._db.execute("UPDATE models SET keep_alive=? WHERE name=? AND tag=?", (seconds, ref.name, ref.tag))

    def delete(self, ref: ModelRef) -> bool:
        with self._lock:
            return self._db.execute("DELETE FROM models WHERE name=? AND tag=?",
                                    (ref.name, ref.tag)).rowcount > 0

    def uses_path(self, path: str) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM models WHERE path=? LIMIT 1", (path,)).fetchone() is not None

    def list(self, after: tuple[str, str] | None, limit: int) -> list[ModelRecord]:
        """Records ordered by (name, tag), strictly after `after`."""
        name, tag = after or ("", "")
        with self._lock:
            rows = self._db.execute(
                f"SELECT {', '.join(_FIELDS)} FROM models WHERE (name, tag) > (?, ?) "
                "ORDER BY name, tag LIMIT ?", (name, tag, limit)).fetchall()
        return [self._record(row) for row in rows]

    @staticmethod
    def _record(row: tuple) -> ModelRecord:
        values = dict(zip(_FIELDS, row, strict=True))
        values["has_chat_template"] = bool(values["has_chat_template"])
        return ModelRecord(**values)
