"""`core.tokens` on Stable Diffusion's REAL CLIP tokenizer (49,408 entries), built offline from the
BPE list of the `open-clip-torch` wheel (tests/fixtures/real_clip.py), and stages 01-02 on a tiny
SD-shaped pipeline that uses it."""
import logging
import warnings

import pytest

from fgbg_utils.core.tokens import (
    TokenError,
    describe_lines,
    describe_words,
    prompt_positions,
    word_positions,
)
from tests.fixtures import real_clip

CAT = [49406, 320, 1125, 539, 320, 2368, 49407]  # "a photo of a cat", as SD 1.x's tokenizer gives


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    try:
        return real_clip.clip_tokenizer(tmp_path_factory.mktemp("sd1"), "sd1")
    except real_clip.MissingBPE as e:
        pytest.fail(str(e))


@pytest.fixture(scope="module")
def sd2(tmp_path_factory):
    return real_clip.clip_tokenizer(tmp_path_factory.mktemp("sd2"), "sd2")


def test_real_vocabulary(sd1, sd2):
    for tok in (sd1, sd2):
        assert len(tok) == 49408 and tok.model_max_length == 77
        assert tok("a photo of a cat").input_ids == CAT
        assert (tok.bos_token_id, tok.eos_token_id) == (49406, 49407)
    assert sd1.pad_token_id == 49407 and sd2.pad_token_id == 0
    assert sd1.convert_ids_to_tokens(0) == "!" and sd1.convert_ids_to_tokens(2368) == "cat</w>"
    pad1 = sd1("a photo of a cat", padding="max_length", max_length=77).input_ids
    pad2 = sd2("a photo of a cat", padding="max_length", max_length=77).input_ids
    assert pad1 == CAT + [49407] * 70 and pad2 == CAT + [0] * 70


def test_single_token_words(sd1):
    assert word_positions(sd1, "a photo of a cat", "cat") == [5]
    assert word_positions(sd1, "A Photo of a CAT", "cat") == [5]
    assert word_positions(sd1, "a photo of a cat, sitting on a mat.", "cat") == [5]
    assert word_positions(sd1, "a photo of a bird", "bird") == [5]
    assert sd1.convert_ids_to_tokens(sd1("a photo of a bird").input_ids[5]) == "bird</w>"


@pytest.mark.parametrize("word,pieces", [
    ("albatross", ["albat", "ross</w>"]),
    ("frigatebird", ["fri", "gate", "bird</w>"]),
    ("kittiwake", ["kit", "ti", "wake</w>"]),
    ("black-footed albatross", ["black</w>", "-</w>", "footed</w>", "albat", "ross</w>"]),
])
def test_split_words_keep_all_positions_and_are_reported(sd1, caplog, word, pieces):
    prompt = f"a photo of a {word} in the sky"
    with caplog.at_level(logging.INFO, logger="fgbg_utils.core.tokens"):
        got = prompt_positions(sd1, prompt, [word])
    pos = list(range(5, 5 + len(pieces)))
    assert got == {word: pos}
    ids = sd1(prompt).input_ids
    assert sd1.convert_ids_to_tokens([ids[p] for p in pos]) == pieces
    assert word_positions(sd1, prompt, "sky") == [pos[-1] + 3]  # counted after the split word
    info = describe_words(sd1, prompt, [word])[word]
    assert info == {"positions": pos, "tokens": pieces, "split": True, "occurrences": 1}
    assert f"splits into {len(pieces)} tokens" in caplog.text
    assert "split into" in describe_lines({word: info})[0]
    assert describe_words(sd1, prompt, ["sky"])["sky"]["split"] is False


def test_substring_of_a_split_word_is_not_the_word(sd1):
    with pytest.raises(TokenError, match="'bird'"):
        word_positions(sd1, "a photo of a frigatebird", "bird")
    assert word_positions(sd1, "a frigatebird and a bird", "bird") == [7]


def test_repeated_word_uses_first_occurrence_and_warns(sd1):
    prompt = "a photo of a cat and a cat toy"
    with pytest.warns(UserWarning, match="occurs 2 times"):
        assert prompt_positions(sd1, prompt, ["cat"]) == {"cat": [5]}
    info = describe_words(sd1, prompt, ["cat"])
    assert info["cat"]["occurrences"] == 2
    assert any("only the first" in line for line in describe_lines(info))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a single occurrence warns nothing
        prompt_positions(sd1, "a photo of a cat", ["cat"])


def test_parts_words(sd1):
    got = prompt_positions(sd1, "a photo of a human with arms and legs", ["human", "arms", "legs"])
    assert got == {"human": [5], "arms": [7], "legs": [9]}  # the official Human3.6M positions
    got = prompt_positions(sd1, "a photo of a albatross with wings", ["albatross", "wings"])
    assert got == {"albatross": [5, 6], "wings": [8]}


def test_77_token_limit(sd1):
    filler = "a " * 70  # "a photo of " + 70 fillers: the next word is at position 74
    assert word_positions(sd1, "a photo of " + filler + "big cat", "cat") == [75]  # last text slot
    with pytest.raises(TokenError, match=r"beyond.*\[76\].*77 tokens.*Shorten `prompt`"):
        word_positions(sd1, "a photo of " + filler + "big fat cat", "cat")
    with pytest.raises(TokenError, match=r"\[75, 76\]"):  # a split word straddling the limit
        word_positions(sd1, "a photo of " + filler + "big albatross", "albatross")
    long = "a photo of a cat " + "on a very long and winding road " * 12  # > 77 tokens; cat early
    assert len(sd1(long).input_ids) > 77
    assert word_positions(sd1, long, "cat") == [5]


def test_sd2_padding_gives_the_same_positions(sd1, sd2):
    for prompt, words in [("a photo of a cat", ["cat"]), ("a photo of a frigatebird!", ["frigatebird"]),
                          ("a photo of a human with arms and legs", ["human", "legs"])]:
        assert prompt_positions(sd2, prompt, words) == prompt_positions(sd1, prompt, words)
    with pytest.raises(TokenError, match="beyond"):
        word_positions(sd2, "a photo of " + "a " * 70 + "big fat cat", "cat")


@pytest.mark.parametrize("prompt,word,match", [
    ("", "cat", "`prompt`"), ("   ", "cat", "`prompt`"),
    ("a photo of a cat", "", "`object`"), ("a photo of a cat", "dog", "'dog' is not in the prompt")])
def test_empty_prompt_or_word(sd1, prompt, word, match):
    with pytest.raises(TokenError, match=match):
        word_positions(sd1, prompt, word)


def test_empty_prompt_template_in_params(tmp_path):
    from fgbg_utils import ParamsError, load_params
    with pytest.raises(ParamsError, match="`prompt`"):
        load_params(None, {"prompt": "", "object": "cat"}, run_dir=str(tmp_path))


# ----------------------------------------------------------------------------- stages 01-02
@pytest.fixture(scope="module")
def tiny_real_clip_sd(tmp_path_factory, sd1):
    from tests.fixtures.make_tiny_sd import build_pipeline
    out = tmp_path_factory.mktemp("tiny-sd-real-clip") / "model"
    pipe = build_pipeline(out.parent / "tok", tokenizer=sd1)
    assert pipe.text_encoder.config.vocab_size == 49408
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def test_stages_01_02_with_real_tokenizer(tiny_real_clip_sd, tmp_path):
    import numpy as np

    from fgbg_utils import load_params
    from fgbg_utils.core.models import load_ldm
    from fgbg_utils.stages import attention_maps, binarization
    from tests.test_sd_path import make_folder

    ldm = load_ldm(str(tiny_real_clip_sd), device="cpu")
    assert ldm.tokenizer("a photo of a cat").input_ids == CAT
    data = make_folder(tmp_path / "birds")
    cfg = load_params(None, {"model.path": str(tiny_real_clip_sd), "dataset.kind": "folder",
                             "dataset.root": str(data), "object": "black-footed albatross",
                             "prompt": "a photo of a {object}", "T0": 2, "attention.grid_steps": 50,
                             "attention.sweep": False, "device": "cpu", "dtype": "float32"},
                      run_dir=str(tmp_path / "run"))
    summary = attention_maps.run(cfg, progress=False)
    assert summary["token_positions"] == {"black-footed albatross": [5, 6, 7, 8, 9]}
    assert summary["n_images"] == summary["n_computed"] == 6
    for image_id in summary["images"]:
        m = attention_maps.load_map(cfg, image_id)
        assert m["mhat"].shape == (8, 8) and np.isfinite(m["mhat"]).all()
        assert m["mhat"][m["frame"].valid(2)].max() == 1.0
    result = binarization.run(cfg, progress=False)
    assert result["n_images"] == 2 and 0.0 <= result["iou"] <= 1.0
    for image_id in summary["images"]:
        assert binarization.load_mpre(cfg, image_id).shape == (8, 8)
