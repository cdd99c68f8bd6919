"""Pages of an in-memory listing: by key, so items that come or go between pages shift nothing."""

import pytest

from llmos.common.errors import InvalidArgument
from llmos.common.paging import page


def test_pages_follow_the_key_and_end_with_an_empty_token():
    items = ["d", "a", "c", "b", "e"]
    first, token = page(items, str, 2, "")
    assert first == ["a", "b"] and token == "b"
    items.remove("a")                       # gone before the next page: nothing is skipped or repeated
    items.append("bb")
    second, token = page(items, str, 2, token)
    assert second == ["bb", "c"] and token == "c"
    last, token = page(items, str, 2, token)
    assert last == ["d", "e"] and token == ""
    assert page(items, str, 0, "") == (sorted(items), "")       # 0: the default of 100


@pytest.mark.parametrize("size", [-1, 1001])
def test_a_page_size_out_of_range_names_the_field(size):
    with pytest.raises(InvalidArgument) as caught:
        page([], str, size, "")
    assert [v.field for v in caught.value.violations] == ["page_size"]
