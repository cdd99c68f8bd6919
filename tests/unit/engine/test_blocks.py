"""The block manager alone: sharing by digest, reference counts, the least recently released
evicted first, and nothing leaked over many random requests."""

import random

import pytest

from llmos.engine.blocks import BlockManager, block_digest


def chain(tokens: list[int], size: int = 4, owner=None) -> list[bytes]:
    out, previous = [], b""
    for i in range(len(tokens) // size):
        previous = block_digest(previous, tokens[i * size:(i + 1) * size], owner)
        out.append(previous)
    return out


def test_block_zero_is_never_handed_out_and_the_pool_runs_dry_exactly():
    m = BlockManager(5, 4)
    assert m.total == m.available == 4
    got = m.allocate(4)
    assert sorted(got) == [1, 2, 3, 4] and m.available == 0 and m.used == 4
    with pytest.raises(RuntimeError):
        m.allocate(1)
    m.release(got)
    assert m.available == 4 and m.used == 0


def test_digests_chain_over_the_blocks_before_and_the_owner():
    a = chain([1, 2, 3, 4, 5, 6, 7, 8])
    b = chain([9, 9, 9, 9, 5, 6, 7, 8])
    assert a[0] != b[0] and a[1] != b[1]              # the same second block after another first
    assert chain([1, 2, 3, 4]) == a[:1]
    assert chain([1, 2, 3, 4], owner=7) != a[:1]      # an adapter's keys are not the base model's


def test_full_blocks_are_shared_by_reference_and_kept_after_their_last_holder():
    m = BlockManager(9, 4)
    digests = chain(list(range(12)))
    first = m.allocate(3)
    for block, digest in zip(first, digests, strict=True):
        m.register(block, digest)
    assert m.lookup(digests) == first
    m.share(first[:2])                                  # a second sequence with the same start
    assert [m.refs(b) for b in first] == [2, 2, 1]
    m.release(first)
    assert [m.refs(b) for b in first] == [1, 1, 0] and m.kept == 1
    m.release(first[:2])
    assert m.kept == 3 and m.used == 0 and m.available == 8
    assert m.lookup(digests) == first                   # still there, unreferenced
    assert m.lookup([digests[0], b"other", digests[2]]) == first[:1]   # up to the first miss


def test_a_second_block_with_the_same_keys_stays_unnamed_and_is_freed():
    m = BlockManager(5, 4)
    digest = chain([1, 2, 3, 4])[0]
    a, b = m.allocate(2)
    m.register(a, digest)
    m.register(b, digest)
    assert m.lookup([digest]) == [a]
    m.release([b])
    assert m.kept == 0
    m.release([a])
    assert m.kept == 1


def test_free_blocks_go_first_then_the_least_recently_released_kept_ones_are_forgotten():
    m = BlockManager(5, 4)
    old, new = chain([1, 1, 1, 1]), chain([2, 2, 2, 2])
    a = m.allocate(1)
    m.register(a[0], old[0])
    b = m.allocate(1)
    m.register(b[0], new[0])
    m.release(a)
    m.release(b)
    assert m.kept == 2
    fresh = m.allocate(2)                  # the two never-named blocks
    assert set(fresh).isdisjoint(a + b) and m.kept == 2
    assert m.allocate(1) == a              # then the least recently released kept one
    assert m.lookup(old) == [] and m.lookup(new) == b


def test_a_sequence_releases_its_last_block_first_so_a_prefix_outlives_what_continues_it():
    m = BlockManager(4, 4)
    digests = chain(list(range(12)))
    blocks = m.allocate(3)
    for block, digest in zip(blocks, digests, strict=True):
        m.register(block, digest)
    m.release(blocks)
    m.allocate(1)                          # evicts the block released first: the last one
    assert m.lookup(digests) == blocks[:2]


def test_releasing_more_often_than_taken_is_an_error():
    m = BlockManager(3, 4)
    block = m.allocate(1)
    m.release(block)
    with pytest.raises(RuntimeError):
        m.release(block)


def test_no_block_leaks_over_1000_random_requests_with_sharing_and_cancellations():
    rng = random.Random(7)
    size, m = 4, BlockManager(65, 4)
    prefixes = [[rng.randrange(50) for _ in range(rng.randrange(4, 20))] for _ in range(6)]
    running: list[list[int]] = []
    for _ in range(1000):
        if running and (rng.random() < 0.45 or m.available < 8):
            # A request ends or is cancelled, at any point of its growth.
            m.release(running.pop(rng.randrange(len(running))))
            continue
        tokens = rng.choice(prefixes) + [rng.randrange(50) for _ in range(rng.randrange(0, 12))]
        digests = chain(tokens, size)
        usable = (len(tokens) - 1) // size
        shared = m.lookup(digests[:usable])
        fresh = -(-len(tokens) // size) - len(shared)
        cost = m.cost(shared, fresh)
        if cost > m.available:
            continue
        before = m.available
        m.share(shared)
        blocks = shared + m.allocate(fresh)
        assert before - m.available == cost
        for i in range(len(shared), len(tokens) // size):
            m.register(blocks[i], digests[i])
        assert len(set(blocks)) == len(blocks) and 0 not in blocks
        running.append(blocks)
    held: dict[int, int] = {}
    for blocks in running:
        for b in blocks:
            held[b] = held.get(b, 0) + 1
    assert all(m.refs(b) == n for b, n in held.items())
    for blocks in running:
        m.release(blocks)
    assert m.used == 0 and m.available == m.total
    assert all(m.refs(b) == 0 for b in range(1, 65))
    m.clear()
    assert m.kept == 0 and m.available == m.total
