import pytest

from tandem.engine.tokenizer import IncrementalDetokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    from tandem.engine.tokenizer import load_tokenizer

    return load_tokenizer(tiny_llama)


def test_multibyte_characters_come_out_whole(tokenizer):
    text = "héllo 日本語 ✓"
    ids = tokenizer.encode(text)
    detok = IncrementalDetokenizer(tokenizer)
    pieces = [detok.add_tokens([i], finished=False) for i in ids]
    pieces.append(detok.add_tokens([], finished=True))
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_stop_string_cuts_text_across_token_boundaries(tokenizer):
    ids = tokenizer.encode("the quick brown fox jumps")
    detok = IncrementalDetokenizer(tokenizer, stop=("brown f",))
    sent = ""
    for i in ids:
        sent += detok.add_tokens([i], finished=False)
        if detok.stopped_on:
            break
    sent += detok.add_tokens([], finished=True)
    assert detok.stopped_on == "brown f"
    assert sent == "the quick "


def test_include_stop_str_in_output(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, stop=("fox",), include_stop_str_in_output=True)
    detok.add_tokens(tokenizer.encode("the quick brown fox jumps"), finished=False)
    assert detok.text == "the quick brown fox"


def test_stream_ending_inside_a_character_matches_full_decode(tokenizer):
    ids = tokenizer.encode("caf\u00e9 \u6f22\u5b57")
    cut = ids[:-1]  # the last character's bytes are split: decoding shows U+FFFD
    detok = IncrementalDetokenizer(tokenizer)
    text = "".join(detok.add_tokens([i], finished=False) for i in cut)
    text += detok.add_tokens([], finished=True)
    assert "\ufffd" in tokenizer.decode(cut)
    assert text == tokenizer.decode(cut)
