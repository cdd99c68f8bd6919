"""Picks the next token of one sequence from its logits, on its own random generator."""

from __future__ import annotations

import secrets

import torch

from llmos.common.domain import SamplingParams

from . import native


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """A generator seeded from `params.seed` (or at random); None for greedy decoding."""
    if params.greedy:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(params.seed if params.seed is not None else secrets.randbits(63))
    return generator


def greedy_picks(logits: torch.Tensor, rows: list[int]) -> list[int]:
    """The most probable token of each of `rows` of the [n, vocab] `logits`, in one operator and one
    copy to the host (one wait for the device on a GPU, not one a row): what `sample` picks for a
    greedy sequence without penalties, bias or constraint (argmax is exact, ties to the lowest id). On the
    CPU, where the engine's kernels are built, through its own kernel: the same ids."""
    if not rows:
        return []
    if (logits.device.type == "cpu" and logits.dtype in native.PICKED_DTYPES and logits.dim() == 2
            and logits.stride(-1) == 1 and native.built()):
        return native.greedy_picks(logits, rows)        # the same ids, quicker (`picks.cpp`)
    picked = logits if len(rows) == logits.shape[0] else logits[torch.tensor(rows, device=logits.device)]
    return torch.argmax(picked, dim=-1).tolist()


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty: seen tokens' positive logits are divided by it, negative ones multiplied."""
    if penalty == 1.0 or seen.numel() == 0:
        return logits
    picked = logits.gather(0, seen)
    logits = logits.clone()
    logits.scatter_(0, seen, torch.where(picked > 0, picked / penalty, picked * penalty))
    return logits


def logprob_of(logits: torch.Tensor, token: int, wanted: bool) -> float:
    return float(torch.log_softmax(logits, dim=-1)[token]) if wanted else 0.0


def top_logprobs(logits: torch.Tensor, n: int) -> list[tuple[int, float]]:
    """The `n` most probable tokens under the model's own distribution, most probable first."""
    values, ids = torch.topk(torch.log_softmax(logits.float(), dim=-1), n)
    return list(zip(ids.tolist(), values.tolist(), strict=True))


def apply_penalties(scores: torch.Tensor, counts: torch.Tensor, presence: float, frequency: float) -> torch.Tensor:
    """OpenAI's presence and frequency penalties: each token's logit less `frequency` times its
    count in the output, and less `presence` if the output holds it at all."""
    return scores - frequency * counts - presence * (counts > 0).to(scores.dtype)


def apply_logit_bias(scores: torch.Tensor, bias: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    ids, values = bias
    return scores.index_add(0, ids, values)


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None,
           seen: torch.Tensor | None, counts: torch.Tensor | None = None,
           bias: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[int, float]:
    """Returns (token id, its log-probability under the model's own distribution).

    `logits` is the 1-D float vector of the last position; `seen` holds the ids of
    the prompt and the output so far (for the repetition penalty), or None when the
    penalty is off; `counts` how often the output holds each token (presence and frequency
    penalties), `bias` the logit bias's ids and values. In that order, as vLLM applies them.
    The log-probability is computed only when `params.logprobs`.
    """
    logits = logits.float()
    scores = logits if seen is None else apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if counts is not None:
        scores = apply_penalties(scores, counts, params.presence_penalty, params.frequency_penalty)
    if bias is not None:
        scores = apply_logit_bias(scores, bias)
    if params.greedy:
        token = int(torch.argmax(scores))
        return token, logprob_of(logits, token, params.logprobs)
    scores = scores / params.temperature
    if 0 < params.top_k < scores.numel():
        kth = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        cumulative = torch.cumsum(torch.softmax(sorted_scores, dim=-1), dim=-1)
        # Drop a token when the tokens before it already reach top_p; always keep the first.
        drop = (cumulative - torch.softmax(sorted_scores, dim=-1)) >= params.top_p
        drop[0] = False
        scores = scores.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    token = int(torch.multinomial(probs, 1, generator=generator))
    return token, logprob_of(logits, token, params.logprobs)
