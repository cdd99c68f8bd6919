"""Aliases: names that point at model versions, alone or split by weight, in the store.

An alias (`chat`, `chat:stable`) shares the models' name space: no model has an alias's
name and tag. Its targets are models or other aliases (never reaching itself), each with a
weight in percent, summing to 100. A request names the alias and is sent to one target by
weighted rendezvous hashing of its route key (a conversation id): the same key gets the same
version while the split stands, and a version whose weight grows keeps every key it had (in a
split of two, keys only move to it).
"""

from __future__ import annotations

import hashlib
import json
import math
import secrets
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import delete, select, tuple_

from llmos.common.errors import FailedPrecondition, InvalidArgument
from llmos.common.names import ModelRef, parse_model_ref
from llmos.common.store import Store, aliases

# Most targets of one alias, and the longest chain of aliases a name resolves through.
MAX_TARGETS = 8
MAX_DEPTH = 8
# Longest rollback window, seconds.
MAX_ROLLBACK_WINDOW = 24 * 3600.0


@dataclass(frozen=True)
class Target:
    model: ModelRef
    weight: int         # percent

    def __str__(self) -> str:
        return f"{self.model}" if self.weight == 100 else f"{self.model}={self.weight}"


@dataclass(frozen=True)
class AliasRecord:
    ref: ModelRef
    targets: tuple[Target, ...]
    previous: tuple[Target, ...] = ()
    rollback_window: float = 0.0
    update_time: float = 0.0


def describe(targets: tuple[Target, ...]) -> str:
    return ", ".join(str(t) for t in targets) or "nothing"


def check_targets(targets: list[tuple[str, int]]) -> tuple[Target, ...]:
    """The targets of a SetAlias, checked: 1 to 8, each named once, weights 1 to 100 summing
    to 100 (a single target's 0 means 100)."""
    if not targets:
        raise InvalidArgument.field("targets", "at least one target is required", reason="MISSING_FIELD")
    if len(targets) > MAX_TARGETS:
        raise InvalidArgument.field("targets", f"at most {MAX_TARGETS} targets")
    if len(targets) == 1 and targets[0][1] == 0:
        targets = [(targets[0][0], 100)]
    checked = []
    for i, (model, weight) in enumerate(targets):
        ref = parse_model_ref(model, f"targets[{i}].model")
        if not 1 <= weight <= 100:
            raise InvalidArgument.field(f"targets[{i}].weight", f"must be between 1 and 100, got {weight}",
                                        reason="INVALID_WEIGHT")
        if any(t.model == ref for t in checked):
            raise InvalidArgument.field(f"targets[{i}].model", f"{ref} is named twice", reason="DUPLICATE_TARGET")
        checked.append(Target(ref, weight))
    total = sum(t.weight for t in checked)
    if total != 100:
        raise InvalidArgument.field("targets", f"the weights must sum to 100, they sum to {total}",
                                    reason="WEIGHTS_NOT_100")
    return tuple(checked)


def pick(record: AliasRecord, key: str) -> Target:
    """The target that serves `key` (a random one by weight when `key` is empty): weighted
    rendezvous hashing, the target with the highest weight / -ln(u(key, target))."""
    if len(record.targets) == 1:
        return record.targets[0]
    key = key or secrets.token_hex(8)

    def score(target: Target) -> float:
        digest = hashlib.blake2b(f"{record.ref}\0{target.model}\0{key}".encode(), digest_size=8).digest()
        u = (int.from_bytes(digest, "big") + 0.5) / 2**64         # in (0, 1)
        return target.weight / -math.log(u)

    return max(record.targets, key=score)


class AliasBook:
    """Alias name → its record, in the store's `aliases` table."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def get(self, ref: ModelRef) -> AliasRecord | None:
        with self.store.begin() as db:
            row = db.execute(select(aliases).where(aliases.c.name == ref.name, aliases.c.tag == ref.tag)).first()
        return self._record(row) if row else None

    def put(self, record: AliasRecord) -> None:
        self.store.put(aliases, self.row(record), "name", "tag")

    @staticmethod
    def row(record: AliasRecord) -> dict:
        return {"name": record.ref.name, "tag": record.ref.tag, "targets": _dump(record.targets),
                "previous_targets": _dump(record.previous), "rollback_window": record.rollback_window,
                "update_time": record.update_time}

    def delete(self, ref: ModelRef) -> bool:
        with self.store.begin() as db:
            return db.execute(delete(aliases).where(aliases.c.name == ref.name,
                                                    aliases.c.tag == ref.tag)).rowcount > 0

    def list(self, after: tuple[str, str] | None, limit: int) -> list[AliasRecord]:
        name, tag = after or ("", "")
        query = (select(aliases).where(tuple_(aliases.c.name, aliases.c.tag) > tuple_(name, tag))
                 .order_by(aliases.c.name, aliases.c.tag).limit(limit))
        with self.store.begin() as db:
            return [self._record(row) for row in db.execute(query).all()]

    def all(self) -> list[AliasRecord]:
        with self.store.begin() as db:
            return [self._record(row) for row in db.execute(select(aliases)).all()]

    @staticmethod
    def _record(row) -> AliasRecord:
        return AliasRecord(ModelRef(row.name, row.tag), _load(row.targets), _load(row.previous_targets),
                           row.rollback_window, row.update_time)


def _dump(targets: tuple[Target, ...]) -> str:
    return json.dumps([[str(t.model), t.weight] for t in targets])


def _load(text: str) -> tuple[Target, ...]:
    return tuple(Target(parse_model_ref(model), weight) for model, weight in json.loads(text))


class Resolver:
    """Follows aliases to models, and checks a new alias's targets against the catalog."""

    def __init__(self, book: AliasBook, is_model: Callable[[ModelRef], bool]) -> None:
        self.book = book
        self._is_model = is_model

    def resolve(self, ref: ModelRef, key: str = "") -> tuple[ModelRef, ModelRef | None]:
        """(the model `ref` sends `key` to, the first alias on the way or None)."""
        first = None
        for _ in range(MAX_DEPTH + 1):
            record = self.book.get(ref)
            if record is None:
                return ref, first
            first = first or record.ref
            ref = pick(record, key).model
        raise FailedPrecondition(f"alias {first} resolves through more than {MAX_DEPTH} aliases",
                                 reason="ALIAS_TOO_DEEP", metadata={"alias": str(first)})

    def check(self, ref: ModelRef, targets: tuple[Target, ...]) -> None:
        """Refuses an alias named like a model, a target that is neither a model nor an alias,
        and targets that lead back to the alias (a cycle) or through too many aliases."""
        if self._is_model(ref):
            raise FailedPrecondition(f"{ref} is a model in the catalog; an alias cannot take its name",
                                     reason="ALIAS_NAME_TAKEN", metadata={"alias": str(ref)})
        for target in targets:
            if target.model == ref:
                raise FailedPrecondition(f"alias {ref} cannot point at itself", reason="ALIAS_CYCLE",
                                         metadata={"alias": str(ref)})
            if not self._is_model(target.model) and self.book.get(target.model) is None:
                raise FailedPrecondition(f"{target.model} is neither a model in the catalog nor an alias",
                                         reason="ALIAS_TARGET_NOT_FOUND",
                                         metadata={"alias": str(ref), "target": str(target.model)})
        graph = {r.ref: [t.model for t in r.targets] for r in self.book.all()}
        graph[ref] = [t.model for t in targets]
        depths: dict[ModelRef, int] = {}

        def depth(alias: ModelRef, path: tuple[ModelRef, ...]) -> int:
            """Aliases `alias` resolves through at most (itself included)."""
            if alias in path:
                cycle = " → ".join(str(r) for r in (*path[path.index(alias):], alias))
                raise FailedPrecondition(f"alias {ref} would make a cycle: {cycle}", reason="ALIAS_CYCLE",
                                         metadata={"alias": str(ref)})
            if alias not in depths:
                depths[alias] = 1 + max((depth(t, (*path, alias)) for t in graph[alias] if t in graph), default=0)
            return depths[alias]

        for alias in graph:
            if depth(alias, ()) > MAX_DEPTH:
                raise FailedPrecondition(f"with this change to {ref}, alias {alias} would resolve through more than "
                                         f"{MAX_DEPTH} aliases", reason="ALIAS_TOO_DEEP",
                                         metadata={"alias": str(ref), "too_deep": str(alias)})

    def leaves(self, targets: tuple[Target, ...], depth: int = 0) -> set[ModelRef]:
        """The models `targets` send traffic to, through any aliases among them."""
        found: set[ModelRef] = set()
        for target in targets:
            record = self.book.get(target.model) if depth < MAX_DEPTH else None
            found |= self.leaves(record.targets, depth + 1) if record else {target.model}
        return found

    def with_traffic(self, changed: AliasRecord | None = None) -> set[ModelRef]:
        """Every model some alias sends traffic to now (or once `changed` is written)."""
        book = {r.ref: r for r in self.book.all()}
        if changed is not None:
            book[changed.ref] = changed

        def leaves(targets: tuple[Target, ...], depth: int) -> set[ModelRef]:
            found: set[ModelRef] = set()
            for target in targets:
                record = book.get(target.model) if depth < MAX_DEPTH else None
                found |= leaves(record.targets, depth + 1) if record else {target.model}
            return found

        return set().union(*(leaves(r.targets, 0) for r in book.values()))

    def pointing_at(self, ref: ModelRef) -> list[ModelRef]:
        """The aliases with `ref` among their targets."""
        return [r.ref for r in self.book.all() if any(t.model == ref for t in r.targets)]
