"""Object-word positions found with the model's own tokenizer (docs/method.md §2.1 "Tokens"): the vendored
tiny CLIP BPE tokenizer of tests/fixtures/tiny-sd and the toy word-level tokenizer."""
from pathlib import Path

import pytest
from transformers import AutoTokenizer, CLIPTokenizer

from fgbg_utils.data import toy
from fgbg_utils.core.tokens import TokenError, prompt_positions, word_positions

TOKENIZER = Path(__file__).resolve().parent / "fixtures" / "tiny-sd" / "tokenizer"


@pytest.fixture(scope="module")
def clip():
    return CLIPTokenizer(str(TOKENIZER / "vocab.json"), str(TOKENIZER / "merges.txt"),
                         model_max_length=77)


@pytest.fixture(scope="module")
def toy_tok():
    return toy.build_tokenizer()


def test_vendored_tokenizer_is_clip_bpe(clip):
    saved = AutoTokenizer.from_pretrained(str(TOKENIZER))  # what load_ldm uses
    assert type(saved).__name__ == "CLIPTokenizer" and saved.model_max_length == 77
    for text in ("a photo of a bird", "a photo of a hummingbird", "a photo of a background"):
        assert saved(text).input_ids == clip(text).input_ids
    ids = clip("a photo of a bird").input_ids
    assert ids[0] == clip.bos_token_id and ids[-1] == clip.eos_token_id
    assert clip.tokenize("a photo of a background") == ["a</w>", "photo</w>", "of</w>", "a</w>",
                                                        "background</w>"]
    assert clip.tokenize("hummingbird") == ["humming", "bird</w>"]


def test_bird_at_position_5(clip):
    assert word_positions(clip, "a photo of a bird", "bird") == [5]
    assert word_positions(clip, "A Photo of a BIRD", "bird") == [5]  # CLIP lower-cases
    ids = clip("a photo of a bird").input_ids
    assert clip.convert_ids_to_tokens(ids[5]) == "bird</w>"


def test_multi_token_word_keeps_all_positions(clip):
    pos = word_positions(clip, "a photo of a hummingbird", "hummingbird")
    assert pos == [5, 6]
    ids = clip("a photo of a hummingbird").input_ids
    assert clip.convert_ids_to_tokens([ids[p] for p in pos]) == ["humming", "bird</w>"]
    # positions are counted in the model input, after a multi-token word too
    assert word_positions(clip, "a photo of a hummingbird in the sky", "sky") == [9]


def test_parts_positions(clip):
    got = prompt_positions(clip, "a photo of a human with arms and legs", ["human", "arms", "legs"])
    assert got == {"human": [5], "arms": [7], "legs": [9]}  # the official Human3.6M positions


def test_absent_word_raises_naming_it(clip):
    with pytest.raises(TokenError, match="'dog'"):
        word_positions(clip, "a photo of a bird", "dog")


def test_substring_is_not_a_match(clip, toy_tok):
    with pytest.raises(TokenError, match="'bird'"):
        word_positions(clip, "a photo of a birdhouse", "bird")
    with pytest.raises(TokenError, match="'bird'"):
        word_positions(clip, "a photo of a hummingbird", "bird")
    with pytest.raises(TokenError):
        word_positions(toy_tok, "a photo of a shapes", "shape")
    # the whole word later in the prompt is still found
    assert word_positions(clip, "a birdhouse and a bird", "bird") == [6]


def test_toy_tokenizer(toy_tok):
    assert word_positions(toy_tok, "a photo of a shape", "shape") == [5]
    assert word_positions(toy_tok, "a photo of a red circle", "circle") == [6]
    assert toy_tok("a photo of a shape").input_ids[5] == toy.VOCAB.index("shape")


def test_toy_unknown_word_raises(toy_tok):
    with pytest.raises(TokenError, match="unknown"):
        word_positions(toy_tok, "a photo of a bird", "bird")


def test_word_beyond_max_length_raises(toy_tok):
    prompt = "a photo of a " + "red " * 10 + "shape"
    with pytest.raises(TokenError, match="beyond"):
        word_positions(toy_tok, prompt, "shape")


@pytest.mark.parametrize("which", ["toy", "clip"])
def test_word_in_the_end_token_slot_raises(which, toy_tok, clip):
    if which == "toy":  # 'shape' would be token 11 of 12
        tok, prompt, word = toy_tok, "a photo of a " + "red " * 6 + "shape", "shape"
    else:  # 'bird' would be token 76 of 77
        tok, prompt, word = clip, "a photo of a " + "a " * 71 + "bird", "bird"
    ids = tok([prompt], padding="max_length", max_length=tok.model_max_length,
              truncation=True).input_ids[0]
    assert ids[tok.model_max_length - 1] == tok.eos_token_id  # the slot holds the end token
    with pytest.raises(TokenError):
        word_positions(tok, prompt, word)
