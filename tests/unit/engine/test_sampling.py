import torch

from llmos.common.domain import SamplingParams
from llmos.engine.sampling import apply_repetition_penalty, greedy_picks, make_generator, sample

CPU = torch.device("cpu")


def _logits(seed: int = 0, n: int = 50) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed))


def test_greedy_picks_the_argmax_and_reports_its_logprob():
    logits = _logits()
    token, logprob = sample(logits, SamplingParams(logprobs=True), None, None)
    assert token == int(torch.argmax(logits))
    assert abs(logprob - float(torch.log_softmax(logits, -1)[token])) < 1e-6


def test_a_steps_greedy_picks_are_each_rows_own_greedy_sample_ties_to_the_lowest_id():
    logits = torch.stack([_logits(i, 300) for i in range(9)])
    logits[4, 17] = logits[4, 250] = logits[4].max() + 1          # a tie: the lower id, as argmax of one row
    params = SamplingParams()
    alone = [sample(row, params, None, None)[0] for row in logits]
    assert alone[4] == 17
    assert greedy_picks(logits, list(range(9))) == alone
    assert greedy_picks(logits, [8, 2, 4]) == [alone[8], alone[2], alone[4]]
    assert greedy_picks(logits, []) == []


def test_same_seed_gives_the_same_tokens():
    params = SamplingParams(temperature=1.0, seed=1234)
    seen = torch.tensor([], dtype=torch.long)

    def draw():
        generator = make_generator(params, CPU)
        return [sample(_logits(i), params, generator, seen)[0] for i in range(20)]

    assert draw() == draw()
    other = SamplingParams(temperature=1.0, seed=4321)
    generator = make_generator(other, CPU)
    assert draw() != [sample(_logits(i), other, generator, seen)[0] for i in range(20)]


def test_top_k_one_is_greedy_and_top_k_limits_the_choice():
    seen = torch.tensor([], dtype=torch.long)
    logits = _logits(3)
    params = SamplingParams(temperature=1.5, top_k=1, seed=0)
    generator = make_generator(params, CPU)
    assert {sample(logits, params, generator, seen)[0] for _ in range(30)} == {int(torch.argmax(logits))}
    params = SamplingParams(temperature=2.0, top_k=3, seed=0)
    generator = make_generator(params, CPU)
    allowed = set(torch.topk(logits, 3).indices.tolist())
    assert {sample(logits, params, generator, seen)[0] for _ in range(200)} <= allowed


def test_top_p_keeps_only_the_nucleus():
    logits = torch.tensor([5.0, 4.0, -5.0, -5.0, -5.0])
    params = SamplingParams(temperature=1.0, top_p=0.5, seed=0)
    generator = make_generator(params, CPU)
    assert {sample(logits, params, generator, torch.tensor([], dtype=torch.long))[0] for _ in range(100)} == {0}


def test_repetition_penalty_lowers_seen_tokens_both_signs():
    logits = torch.tensor([2.0, -2.0, 1.0])
    out = apply_repetition_penalty(logits, torch.tensor([0, 1]), 2.0)
    assert out.tolist() == [1.0, -4.0, 1.0]
    assert logits.tolist() == [2.0, -2.0, 1.0]
