"""`common.heap`: what a service holds for its life frozen out of the garbage collector's walks, and a cycle
among frozen objects freed once it is let go."""

from __future__ import annotations

import gc
import weakref

import pytest

from llmos.common import heap


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


def cycle() -> tuple[Node, weakref.ref]:
    a, b = Node(), Node()
    a.other, b.other = b, a
    return a, weakref.ref(b)


@pytest.fixture
def unfrozen():
    yield
    gc.unfreeze()


def test_settle_freezes_what_is_alive_and_collects_what_is_not(unfrozen):
    garbage = cycle()[1]                    # unreachable now, but only the collector frees a cycle
    held, alive = cycle()
    assert garbage() is not None
    heap.settle()
    assert garbage() is None, "garbage was collected before freezing"
    assert gc.get_freeze_count() > 0
    del held
    gc.collect()
    assert alive() is not None, "a frozen cycle is out of the collector's reach"


def test_release_frees_a_frozen_cycle_that_was_let_go(unfrozen):
    held, let_go = cycle()
    heap.settle()
    del held
    gc.collect()
    assert let_go() is not None
    heap.release()
    assert let_go() is None
    assert gc.get_freeze_count() > 0, "what is still alive is frozen again"
