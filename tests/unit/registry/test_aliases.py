"""How an alias picks a version: weights checked, a key sticks, a growing share keeps its keys."""

from collections import Counter

import pytest

from llmos.common.errors import InvalidArgument
from llmos.common.names import ModelRef
from llmos.registry.aliases import AliasRecord, Target, check_targets, pick


def split(**weights: int) -> AliasRecord:
    return AliasRecord(ModelRef("chat"), tuple(Target(ModelRef("m", tag), w) for tag, w in weights.items()))


def test_a_split_lands_near_its_weights_and_a_key_always_gets_the_same_version():
    alias = split(v1=90, v2=10)
    picks = [pick(alias, f"conversation-{i}").model.tag for i in range(10_000)]
    assert abs(Counter(picks)["v2"] / 10_000 - 0.10) < 0.015
    assert [pick(alias, f"conversation-{i}").model.tag for i in range(200)] == picks[:200]


def test_growing_a_versions_share_keeps_its_keys_and_takes_only_from_the_shrinking():
    before, after = split(v1=70, v2=20, v3=10), split(v1=50, v2=40, v3=10)
    moves = Counter()
    for i in range(5000):
        was, now = pick(before, str(i)).model.tag, pick(after, str(i)).model.tag
        moves[was, now] += 1
        assert was != "v2" or now == "v2"           # the grown version keeps every key it had
        assert was != "v3" or now in ("v3", "v2")   # an unchanged one loses keys only to the grown one
    assert moves["v1", "v2"] > 0


def test_without_a_key_the_pick_is_random_by_weight():
    alias = split(v1=50, v2=50)
    assert len({pick(alias, "").model.tag for _ in range(200)}) == 2


@pytest.mark.parametrize("targets, reason", [
    ([], "MISSING_FIELD"),
    ([("m:v1", 80), ("m:v2", 30)], "WEIGHTS_NOT_100"),
    ([("m:v1", 100), ("m:v2", 0)], "INVALID_WEIGHT"),
    ([("m:v1", 50), ("m:v1", 50)], "DUPLICATE_TARGET"),
    ([("M:v1", 100)], "INVALID_MODEL_NAME"),
])
def test_bad_targets_are_refused_with_their_reason(targets, reason):
    with pytest.raises(InvalidArgument) as refused:
        check_targets(targets)
    assert refused.value.reason == reason


def test_one_target_of_weight_0_means_all_of_it():
    assert check_targets([("m:v1", 0)]) == (Target(ModelRef("m", "v1"), 100),)
