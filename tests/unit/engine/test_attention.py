"""Attention over the paged cache: a sequence's output is bit for bit the same alone and beside a
longer one (keys read in whole blocks, the rest masked), wherever its blocks lie in the pool."""

import torch

from llmos.engine.attention import BLOCK, LayerShape, PagedCache, Part, Step, attend


def filled_cache(blocks: int, seed: int = 0) -> PagedCache:
    cache = PagedCache([LayerShape(2, 8, 8)], blocks, torch.float32, torch.device("cpu"))
    generator = torch.Generator().manual_seed(seed)
    for t in cache.tensors:
        t[:, 1:] = torch.randn(t[:, 1:].shape, generator=generator)
    return cache


def test_a_step_reads_whole_blocks_in_groups_of_like_length_and_masks_what_each_does_not_hold():
    step = Step([Part([3], 4, 1, decode=True), Part([5, 6, 7], 2 * BLOCK + 3, 1, decode=True),
                 Part([8], 9, 1, decode=True), Part([2, 4], 0, BLOCK + 2)], torch.device("cpu"))
    # One block each for the first and third; the second's three read as four (a power of two, block 0 padding).
    assert [(g.rows.tolist(), g.tables.tolist(), g.length) for g in step.groups] == [
        ([0, 2], [3, 8], BLOCK), ([1], [5, 6, 7, 0], 4 * BLOCK)]
    assert step.slots.tolist()[:3] == [3 * BLOCK + 4, 7 * BLOCK + 3, 8 * BLOCK + 9]
    assert step.slots.tolist()[3:] == [2 * BLOCK + i for i in range(BLOCK)] + [4 * BLOCK, 4 * BLOCK + 1]
    (short, long), (chunk,) = step.decode_biases(None), step.chunk_biases(None)
    assert (short[0, :, 0] == 0).sum(dim=-1).tolist() == [5, 10]
    assert (long[0, :, 0] == 0).sum(dim=-1).tolist() == [2 * BLOCK + 4]
    assert chunk.shape == (BLOCK + 2, 2 * BLOCK) and (chunk[-1] == 0).sum() == BLOCK + 2


def test_a_sequence_attends_the_same_alone_and_beside_a_longer_one_wherever_its_blocks_lie():
    cache = filled_cache(12)
    q = torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(1))
    cpu = torch.device("cpu")
    alone = attend(Step([Part([2, 9], BLOCK + 5, 1, decode=True)], cpu), cache, 0, q[:1], 0.3)
    beside = attend(Step([Part([2, 9], BLOCK + 5, 1, decode=True), Part([4, 5, 6, 7, 8], 4 * BLOCK + 9, 1,
                                                                         decode=True)], cpu), cache, 0, q, 0.3)
    assert torch.equal(alone[0], beside[0])
    # In one group with another of two blocks (a batch of two products, not one): the same.
    paired = attend(Step([Part([2, 9], BLOCK + 5, 1, decode=True), Part([4, 5], BLOCK + 13, 1, decode=True)], cpu),
                    cache, 0, q, 0.3)
    assert len(Step([Part([2, 9], BLOCK + 5, 1, decode=True), Part([4, 5], BLOCK + 13, 1, decode=True)],
                    cpu).groups) == 1
    assert torch.equal(alone[0], paired[0])
    # The same keys and values copied to other blocks give the same output.
    for t in cache.tensors:
        t[:, [10, 11]] = t[:, [2, 9]]
    moved = attend(Step([Part([10, 11], BLOCK + 5, 1, decode=True)], cpu), cache, 0, q[:1], 0.3)
    assert torch.equal(alone, moved)
