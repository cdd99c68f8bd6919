"""A service's long-lived objects kept out of the cyclic garbage collector's walks.

Python's collector walks every tracked object in a full collection: in a worker holding SmolLM2
some 436,000 (torch, transformers, grpc and the model's own), 180 ms during which the interpreter
is held, so every stream of the process stops; one comes whenever the objects that outlived the
young collections since the last one reach a quarter of those. What a service holds for its life
(its modules, its servers, a worker's models) is frozen (`gc.freeze`) once it is up, and a worker's
again as it loads or unloads a model: full collections then walk only what came since (4.6 ms in
a worker serving 64 streams). Reference counting frees frozen objects as ever; only cycles among
them wait for `release`.
"""

from __future__ import annotations

import gc


def settle() -> None:
    """Collects what is garbage now, then freezes everything alive."""
    gc.collect()
    gc.freeze()


def release() -> None:
    """After something long-lived was let go (a worker's model): the frozen objects back under the
    collector, which frees any cycle among what was let go, then `settle` again."""
    gc.unfreeze()
    settle()
