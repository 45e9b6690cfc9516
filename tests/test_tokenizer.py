"""The character tokenizer: exact round trip, one token per character, no silent unknowns."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from critical_tokens.addition import completion, prompt
from critical_tokens.tokenizer import CHARACTERS, build_tokenizer, decode, encode, load_tokenizer

operands = st.integers(min_value=1, max_value=20).flatmap(
    lambda digits: st.integers(min_value=0 if digits == 1 else 10 ** (digits - 1), max_value=10**digits - 1)
)


@settings(max_examples=100, deadline=None)
@given(a=operands, b=operands)
def test_scratchpad_round_trips_one_token_per_character(tokenizer, a, b):
    text = prompt(a, b) + completion(a, b)
    ids = encode(tokenizer, text)
    assert len(ids) == len(text)
    assert decode(tokenizer, ids) == text
    # one token per character: each id is the id of its own character
    assert ids == [tokenizer.convert_tokens_to_ids(ch) for ch in text]


def test_every_character_is_its_own_token(tokenizer):
    ids = encode(tokenizer, CHARACTERS)
    assert ids == list(range(len(CHARACTERS)))
    assert len(tokenizer) == len(CHARACTERS) + 2  # + end-of-text and padding


def test_save_and_load_give_the_same_ids(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    text = prompt(907, 3) + completion(907, 3)
    assert encode(loaded, text) == encode(tokenizer, text)
    assert decode(loaded, encode(loaded, text)) == text
    assert (loaded.eos_token_id, loaded.pad_token_id) == (tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert loaded.padding_side == "left"
    assert len(loaded) == len(tokenizer)


def test_unknown_character_raises_naming_it(tokenizer):
    with pytest.raises(ValueError, match="'x'"):
        encode(tokenizer, "12x+3")


def test_special_tokens_are_distinct_and_decode_skips_them(tokenizer):
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    assert eos is not None and pad is not None and eos != pad
    ids = encode(tokenizer, "1 6 8\n")
    assert eos not in ids and pad not in ids
    assert decode(tokenizer, [pad, pad] + ids + [eos, pad]) == "1 6 8\n"


def test_build_is_deterministic():
    assert build_tokenizer().get_vocab() == build_tokenizer().get_vocab()
