"""The prefix cache's bookkeeping: which free slot keeps which tokens, what a prompt reuses,
and where a leaving sequence is kept."""

from llmos.engine.prefix import PrefixCache, common_prefix


def test_common_prefix_counts_the_shared_leading_tokens():
    assert common_prefix([1, 2, 3], [1, 2, 3]) == 3
    assert common_prefix([1, 2, 3], [1, 2]) == 2
    assert common_prefix([1, 2, 3, 4, 5, 6, 7], [1, 2, 3, 4, 9, 6, 7]) == 4
    assert common_prefix([5], [1]) == 0 and common_prefix([], [1]) == 0


def test_a_prompt_reuses_the_longest_kept_prefix_but_never_its_last_token():
    cache = PrefixCache()
    cache.keep(7, [1, 2, 3, 4])
    cache.keep(6, [1, 2, 9])
    assert cache.match([1, 2, 3, 4, 5], slot=3) == (7, 4)
    assert cache.match([1, 2, 3, 4], slot=3) == (7, 3)       # the last prompt token is computed
    assert cache.match([1, 2, 9, 9], slot=3) == (6, 3)
    assert cache.match([8, 8], slot=3) == (3, 0)
    assert cache.tokens == 7


def test_on_a_tie_the_joining_slot_itself_wins_and_nothing_is_copied():
    cache = PrefixCache()
    cache.keep(5, [1, 2, 3])
    cache.keep(2, [1, 2, 3])
    assert cache.match([1, 2, 3, 4], slot=2) == (2, 3)
    assert cache.match([1, 2, 3, 4], slot=9) == (2, 3)        # else the one used last (2, just now)
    cache.keep(5, [1, 2, 3])
    assert cache.match([1, 2, 3, 4], slot=9) == (5, 3)


def test_a_leaving_sequence_is_kept_high_and_evicts_the_least_recently_used():
    cache = PrefixCache()
    assert cache.place(2, 4) == 3
    cache.keep(3, [1])
    assert cache.place(2, 4) == 2
    cache.keep(2, [2])
    cache.match([1, 5], slot=0)                               # slot 3 used: 2 is least recent
    assert cache.place(2, 4) == 2
    assert cache.place(4, 4) is None
    cache.drop(2)
    cache.drop(3)
    assert cache.tokens == 0


def test_a_running_sequences_slot_serves_when_it_shares_more():
    cache = PrefixCache()
    cache.keep(5, [1, 2])
    assert cache.match([1, 2, 3, 4], slot=3, running=[(0, [1, 2, 3])]) == (0, 3)
    assert cache.match([1, 2, 9], slot=3, running=[(0, [1, 2, 3])]) == (5, 2)   # a tie: the kept one
