"""Pages of a listing held in memory (AIP-158): `page_size` items after the page token, the
token being the sort key of the last item given (a key, not an index: items that come or go
between pages shift nothing)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

from .errors import InvalidArgument

T = TypeVar("T")
MAX_PAGE = 1000
DEFAULT_PAGE = 100


def page_size(size: int) -> int:
    """A request's page size: 1 to 1000, 0 meaning 100."""
    if size < 0 or size > MAX_PAGE:
        raise InvalidArgument.field("page_size", f"must be between 0 and {MAX_PAGE}")
    return size or DEFAULT_PAGE


def page(items: Iterable[T], key: Callable[[T], str], size: int, token: str) -> tuple[list[T], str]:
    """The page of `items` (any order) after `token`, sorted by `key`, and the next page's token
    ("" on the last page)."""
    size = page_size(size)
    ordered: Sequence[T] = sorted(items, key=key)
    rest = [item for item in ordered if key(item) > token] if token else list(ordered)
    return rest[:size], key(rest[size - 1]) if len(rest) > size else ""


async def every_page(method, request, field: str, timeout: float) -> list:
    """Every item of a paged List RPC on an asyncio stub, one page after another."""
    items: list = []
    while True:
        response = await method(request, timeout=timeout)
        items.extend(getattr(response, field))
        if not response.next_page_token:
            return items
        request.page_token = response.next_page_token
