"""The model catalog, in the store: one row per name and tag."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from sqlalchemy import delete, select, tuple_, update

from llmos.common.errors import InvalidArgument
from llmos.common.names import ModelRef
from llmos.common.paging import page_size as checked_page_size
from llmos.common.store import Store, models


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
    # The engine's forward path for it ("llmos" or "transformers", `common.architectures`).
    implementation: str = "llmos"
    # A LoRA adapter's base model ("name:tag") and rank; "" and 0 for a model.
    base: str = ""
    adapter_rank: int = 0
    # How it writes tool calls ("hermes", "llama3_json", "mistral"; "" without a chat template).
    tool_call_format: str = ""
    # What it serves: "generate", "embed", "classify" or "score".
    task: str = "generate"

    @property
    def ref(self) -> ModelRef:
        return ModelRef(self.name, self.tag)

    @property
    def served_by(self) -> ModelRef:
        """The model whose placements serve it: its base for an adapter, else itself."""
        return ModelRef(*self.base.split(":", 1)) if self.base else self.ref


_FIELDS = [f.name for f in dataclasses.fields(ModelRecord)]

T = TypeVar("T")


def page_by_ref(fetch: Callable[[tuple[str, str] | None, int], list[T]], ref_of: Callable[[T], ModelRef],
                page_size: int, page_token: str) -> tuple[list[T], str]:
    """A page of a store listing ordered by (name, tag): `fetch(after, limit)` gives the rows after
    `after`; the page token is the last row's "name:tag"."""
    size = checked_page_size(page_size)
    after = None
    if page_token:
        name, sep, tag = page_token.partition(":")
        if not sep:
            raise InvalidArgument.field("page_token", "is not a token this service issued",
                                        reason="INVALID_PAGE_TOKEN")
        after = (name, tag)
    rows = fetch(after, size + 1)
    return rows[:size], str(ref_of(rows[size - 1])) if len(rows) > size else ""


class Catalog:
    """Name and tag → model record, in the store's `models` table; every write is one transaction."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def close(self) -> None:
        self.store.close()

    def get(self, ref: ModelRef) -> ModelRecord | None:
        with self.store.begin() as db:
            row = db.execute(select(models).where(models.c.name == ref.name, models.c.tag == ref.tag)).first()
        return self._record(row) if row else None

    def put(self, record: ModelRecord) -> None:
        self.store.put(models, dataclasses.asdict(record), "name", "tag")

    def set_measured(self, ref: ModelRef, nbytes: int) -> None:
        self._update(ref, measured_bytes=nbytes)

    def set_keep_alive(self, ref: ModelRef, seconds: float) -> None:
        self._update(ref, keep_alive=seconds)

    def _update(self, ref: ModelRef, **values) -> None:
        with self.store.begin() as db:
            db.execute(update(models).where(models.c.name == ref.name, models.c.tag == ref.tag).values(**values))

    def delete(self, ref: ModelRef) -> bool:
        with self.store.begin() as db:
            return db.execute(delete(models).where(models.c.name == ref.name, models.c.tag == ref.tag)).rowcount > 0

    def adapters_of(self, ref: ModelRef) -> list[ModelRef]:
        """The LoRA adapters imported against `ref`."""
        with self.store.begin() as db:
            rows = db.execute(select(models.c.name, models.c.tag).where(models.c.base == str(ref))).all()
        return [ModelRef(row.name, row.tag) for row in rows]

    def uses_path(self, path: str) -> bool:
        with self.store.begin() as db:
            return db.execute(select(models.c.name).where(models.c.path == path).limit(1)).first() is not None

    def list(self, after: tuple[str, str] | None, limit: int) -> list[ModelRecord]:
        """Records ordered by (name, tag), strictly after `after`."""
        name, tag = after or ("", "")
        query = (select(models).where(tuple_(models.c.name, models.c.tag) > tuple_(name, tag))
                 .order_by(models.c.name, models.c.tag).limit(limit))
        with self.store.begin() as db:
            rows = db.execute(query).all()
        return [self._record(row) for row in rows]

    @staticmethod
    def _record(row) -> ModelRecord:
        values = {f: getattr(row, f) for f in _FIELDS}
        values["has_chat_template"] = bool(values["has_chat_template"])
        return ModelRecord(**values)
