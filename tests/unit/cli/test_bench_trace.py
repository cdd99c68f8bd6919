"""`llmos bench`'s trace of one stream: the time to first token runs to the first text, as the HTTP client (which
sees only text) measures it, so the gRPC doors and an OpenAI peer are measured alike."""

from llmos.cli.bench import Trace


def test_a_first_token_without_text_does_not_end_the_time_to_first_token():
    trace = Trace(started=10.0, arrivals=[(10.02, 1), (10.03, 1), (10.04, 1)], shown=10.03)
    assert abs(trace.ttft - 0.03) < 1e-9
    assert trace.tokens == 3, "every token still counts"
    assert len(trace.gaps()) == 2


def test_without_text_seen_the_first_token_ends_it():
    assert abs(Trace(started=1.0, arrivals=[(1.5, 2)]).ttft - 0.5) < 1e-9
