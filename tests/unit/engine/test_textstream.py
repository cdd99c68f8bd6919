import random

from llmos.engine.textstream import Detokenizer, StopStrings, decoder_of


def test_stop_string_split_over_pieces_is_cut_exactly():
    stops = StopStrings(("END",))
    emitted = []
    for piece in ["Hello E", "N", "D and more"]:
        out, stopped = stops.push(piece)
        emitted.append(out)
        if stopped:
            break
    assert "".join(emitted) == "Hello "
    assert stopped
    assert stops.text == "Hello "


def test_text_that_only_looks_like_a_stop_start_is_released_later():
    stops = StopStrings(("END",))
    assert stops.push("an E") == ("an ", False)
    assert stops.push("xit") == ("Exit", False)
    assert stops.flush() == ""


def test_flush_releases_a_held_tail_when_generation_ends_otherwise():
    stops = StopStrings(("###",))
    assert stops.push("done #") == ("done ", False)
    assert stops.flush() == "#"


def test_earliest_of_several_stop_strings_wins():
    stops = StopStrings(("world", "lo w"))
    out, stopped = stops.push("hello world")
    assert (out, stopped) == ("hel", True)


def test_no_stop_strings_passes_text_through():
    stops = StopStrings(())
    assert stops.push("abc") == ("abc", False)


def test_incremental_decoding_equals_full_decoding_for_non_ascii(tiny_tokenizer):
    text = "Café déjà vu: 東京は日本の首都です。 🙂🚀 Paris"
    ids = tiny_tokenizer(text)["input_ids"]
    detok = Detokenizer(tiny_tokenizer, prompt_ids=[])
    pieces = [detok.push(i) for i in ids]
    assert "".join(pieces) == tiny_tokenizer.decode(ids)
    assert all("\ufffd" not in p for p in pieces)
    assert any(p == "" for p in pieces), "some tokens end inside a multi-byte character"


def test_incremental_decoding_keeps_the_leading_space_after_a_prompt(tiny_tokenizer):
    prompt = tiny_tokenizer("The capital of France is")["input_ids"]
    answer = tiny_tokenizer(" Paris. The capital")["input_ids"]
    detok = Detokenizer(tiny_tokenizer, prompt)
    assert "".join(detok.push(i) for i in answer) == " Paris. The capital"


def test_flush_releases_an_incomplete_character_at_the_end(tiny_tokenizer):
    ids = tiny_tokenizer("🙂")["input_ids"]
    assert len(ids) > 1, "the emoji takes several byte tokens"
    detok = Detokenizer(tiny_tokenizer, prompt_ids=[])
    held = "".join(detok.push(i) for i in ids[:-1])
    assert held == ""
    assert held + detok.flush() == tiny_tokenizer.decode(ids[:-1])


def test_a_fast_tokenizers_ids_are_decoded_by_its_backend_as_transformers_decodes_them(tiny_tokenizer):
    rng = random.Random(0)
    cases = [[rng.randrange(len(tiny_tokenizer)) for _ in range(rng.randint(1, 8))] for _ in range(300)]
    # Special tokens among them: skipped by both.
    expected = [tiny_tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
                for ids in cases]
    real, calls = tiny_tokenizer.backend_tokenizer, []

    class Watched:
        def decode(self, ids, skip_special_tokens):
            calls.append(list(ids))
            return real.decode(ids, skip_special_tokens=skip_special_tokens)

    wrapped = []

    def through_transformers(*args, **kwargs):
        wrapped.append(args)
        return type(tiny_tokenizer).decode(tiny_tokenizer, *args, **kwargs)

    tiny_tokenizer._tokenizer = Watched()          # what `backend_tokenizer` returns
    tiny_tokenizer.decode = through_transformers
    try:
        decode = decoder_of(tiny_tokenizer)
        assert [decode(ids) for ids in cases] == expected
    finally:
        tiny_tokenizer._tokenizer = real
        del tiny_tokenizer.decode
    assert calls == cases, "each list of ids went to the backend once"
    assert not wrapped, "and not through transformers' decode"


def test_a_tokenizer_whose_class_decodes_its_own_way_is_decoded_through_it(tiny_tokenizer):
    class Shouting(type(tiny_tokenizer)):
        def decode(self, token_ids, **kwargs):
            return super().decode(token_ids, **kwargs).upper()

    tiny_tokenizer.__class__ = Shouting
    try:
        ids = tiny_tokenizer("Paris is the capital")["input_ids"]
        assert decoder_of(tiny_tokenizer)(ids) == "PARIS IS THE CAPITAL"
        detok = Detokenizer(tiny_tokenizer, prompt_ids=[])
        assert "".join(detok.push(i) for i in ids) + detok.flush() == "PARIS IS THE CAPITAL"
    finally:
        tiny_tokenizer.__class__ = Shouting.__mro__[1]
