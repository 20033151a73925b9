"""The runtime tokenizer (tokenizers library, no transformers) gives transformers' CLIPTokenizer ids."""
from __future__ import annotations

import warnings

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sdrt.runtime.tokenizer import ClipTokenizer, TruncationWarning

CORPUS = [
    "", " ", "\n\t ", "a photo of an astronaut riding a horse on mars", "A RED Circle, on a   blue background.",
    "naïve café — Ünïcödé straße ½ ∞ 東京タワー ¿qué?", "emoji 🐱🚀👩‍👩‍👧 ❤️", "don't won't it's we'll I'm they're",
    "(masterpiece:1.2), [blurry], <lora:x:0.5>", "12345 3.14 1e-5 #hashtag @user",
    " ".join(["lighthouse"] * 100),  # far over 77 tokens
    ", ".join(["best quality", "ultra detailed", "8k"] * 20),
]


def ours_and_reference(models, bundles, family):
    from transformers import CLIPTokenizer

    reference = CLIPTokenizer.from_pretrained(str(models[family] / "tokenizer"))
    import sdrt.runtime.manifest as mf

    m = mf.load_manifest(bundles[family])
    return ClipTokenizer.from_folder(bundles[family] / "tokenizer", m.tokenizer_max_length, m.tokenizer_pad_id), reference


@pytest.mark.parametrize("family,pad_id", [("sd1", 49407), ("sd2", 0)])
def test_ids_equal_transformers_on_the_corpus(models, bundles, family, pad_id):
    ours, reference = ours_and_reference(models, bundles, family)
    assert ours.pad_id == pad_id == reference.pad_token_id
    for prompt in CORPUS:
        want = reference(prompt, padding="max_length", max_length=77, truncation=True).input_ids
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", TruncationWarning)
            got = ours([prompt])[0].tolist()
        assert got == want, prompt


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=120))
def test_ids_equal_transformers_on_any_text(models, bundles, text):
    ours, reference = _cached(models, bundles)
    want = reference(text, padding="max_length", max_length=77, truncation=True).input_ids
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TruncationWarning)
        assert ours([text])[0].tolist() == want


_CACHE = {}


def _cached(models, bundles):
    if "sd1" not in _CACHE:
        _CACHE["sd1"] = ours_and_reference(models, bundles, "sd1")
    return _CACHE["sd1"]


def test_golden_ids():
    """Ids of the real CLIP vocabulary, as published tokenizers give them."""
    from pathlib import Path

    import sdrt.export
    from sdrt.runtime.tokenizer import build_clip_tokenizer

    folder = Path(sdrt.export.__file__).parent / "clip_tokenizer"
    tok = ClipTokenizer(build_clip_tokenizer(folder / "vocab.json", folder / "merges.txt"))
    assert tok.token_ids("a photo of a cat") == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tok.token_ids("") == [49406, 49407]
    row = tok([""])[0]
    assert row.shape == (77,) and row[0] == 49406 and (row[1:] == 49407).all()


def test_long_prompts_are_truncated_with_a_warning_that_names_the_dropped_words(models, bundles):
    ours, _ = ours_and_reference(models, bundles, "sd1")
    prompt = " ".join(["red"] * 75) + " purple elephant"
    with pytest.warns(TruncationWarning, match="dropped: 'purple elephant'"):
        ids = ours([prompt])[0]
    assert ids[-1] == ours.eos_id and len(ids) == 77


def test_sd2s_published_layout_treats_the_pad_token_as_special(tmp_path):
    """SD 2.x's tokenizer folder as published: vocab.json + merges.txt, pad token "!" (no tokenizer.json)."""
    from tiny_models import write_tokenizer_folder
    from transformers import CLIPTokenizer

    from sdrt.runtime.tokenizer import read_pad_id

    write_tokenizer_folder(tmp_path, "!")
    reference = CLIPTokenizer.from_pretrained(str(tmp_path))
    ours = ClipTokenizer.from_folder(tmp_path, 77, read_pad_id(tmp_path))
    for prompt in ["a red circle on a blue background!!", "wow!!! so!", "!"] + CORPUS[:6]:
        assert ours([prompt])[0].tolist() == reference(prompt, padding="max_length", max_length=77).input_ids, prompt
