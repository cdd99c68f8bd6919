from llmos.engine.textstream import Detokenizer, StopStrings


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
