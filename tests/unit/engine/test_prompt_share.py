"""How many prompt tokens a CPU engine step feeds: about sqrt((step cost + decoding rows) x what
waits), never less than the first prompt's rest, never more than the budget."""

from types import SimpleNamespace

from llmos.engine import Engine


def share(waiting: list[int], decoding: int = 0, step_tokens: int = 32, budget: int = 256, cached: int = 0) -> int:
    engine = SimpleNamespace(step_tokens=step_tokens, prefill_budget=budget)
    prompts = [SimpleNamespace(fill_to=n, cached=cached if i == 0 else 0) for i, n in enumerate(waiting)]
    return Engine.prompt_share(engine, prompts, decoding)


def test_many_short_prompts_are_fed_a_share_a_step():
    assert share([12] * 15) == 75                    # isqrt(32 x 180): about six of fifteen
    assert share([12] * 64) == 156                   # isqrt(32 x 768)
    # Rows decoding beside them make each step dearer, so a step feeds more.
    assert share([12] * 15, decoding=64) == 131      # isqrt(96 x 180)
    assert share([12] * 64, decoding=64) == 256      # the budget


def test_one_prompt_is_never_cut_below_its_rest_nor_past_the_budget():
    assert share([40]) == 40                         # isqrt(32 x 40) = 35 would cut it
    assert share([200]) == 200
    assert share([2000]) == 256
    assert share([40, 12], cached=30) == 26          # 10 of the first and 12 wait: isqrt(32 x 22), all of it fits
    assert share([5, 5]) == 17                       # isqrt(32 x 10), more than waits: all of it fits


def test_without_a_step_cost_every_step_feeds_the_budget():
    assert share([12] * 15, step_tokens=0) == 256
    assert share([], step_tokens=32) == 256
