"""Prompt handling through the pipeline: A1111 emphasis, long prompts in chunks, clip skip against diffusers'
clip_skip, textual-inversion embeddings against diffusers' load_textual_inversion.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import latents, pixels
from test_parity import use_scheduler

from sdrt.errors import InvalidRequest, PickleRefused
from sdrt.runtime.prompt import apply_emphasis
from sdrt.runtime.text import TextOptions

TOLERANCE = 2 / 255
LONG = ", ".join(f"a {c} {s} on a {b} background" for c in ("red", "green", "blue") for s in ("circle", "square")
                 for b in ("white", "black"))  # 12 phrases, about 90 tokens


def test_emphasis_scales_the_token_and_restores_the_mean(pipes):
    pipe = pipes["sd1"]
    plain = pipe.encode_prompt(["a red circle"])  # (1, 77, D)
    weighted = pipe.encode_prompt(["a (red:1.5) circle"])
    weights = np.ones((1, 77), np.float32)
    weights[0, 2] = 1.5  # BOS, "a", "red"
    np.testing.assert_allclose(weighted, apply_emphasis(plain, weights), rtol=1e-5, atol=1e-6)
    assert np.abs(weighted - plain).max() > 1e-3
    literal = pipe.encode_prompt(["a (red:1.5) circle"], TextOptions(emphasis=False))  # brackets are text
    assert not np.allclose(literal, weighted, atol=1e-3)


def test_a_long_prompt_is_encoded_in_chunks_and_the_negative_is_padded(pipes):
    pipe = pipes["sd1"]
    tokens = len(pipe.tokenizer.token_ids(LONG)) - 2
    assert 75 < tokens <= 150
    cond = pipe.encode_prompt(["", LONG])
    assert cond.shape[:2] == (2, 154)
    empty = pipe.encode_prompt([""])
    np.testing.assert_allclose(cond[0, 77:], empty[0], rtol=1e-5, atol=1e-6)  # padded with the empty chunk
    # A1111 cuts at the last comma before 75 tokens: the second chunk is the tail, encoded on its own
    head_ids = pipe.tokenizer.token_ids(LONG)[1:76]
    comma = pipe.tokenizer.token_ids(",")[1]
    cut = len(head_ids) - head_ids[::-1].index(comma)
    tail = LONG.split(", ")[len([i for i in head_ids[:cut] if i == comma]):]
    np.testing.assert_allclose(cond[1, 77:], pipe.encode_prompt([", ".join(tail)])[0], rtol=1e-5, atol=1e-5)


def test_long_prompts_generate_and_differ_from_truncation(pipes):
    lat = latents(1, seed=2)
    chunked = pixels(pipes["sd1"].txt2img(LONG, steps=4, latents=lat))
    with pytest.warns(UserWarning, match="dropped"):
        truncated = pixels(pipes["sd1"].txt2img(LONG, steps=4, latents=lat, truncate=True))
    assert np.abs(chunked - truncated).mean() > 1e-3


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_clip_skip_matches_diffusers(pipes, reference, family):
    """A1111's clip skip 2 is diffusers' clip_skip=1. Guidance off: diffusers skips layers for the prompt but
    not for the negative prompt, where A1111 (and sdrt) skip them for both."""
    lat = latents(1, seed=5)
    got = pixels(pipes[family].txt2img("a blue square", steps=6, latents=lat, clip_skip=2, guidance=1.0))
    ref = reference[family]
    use_scheduler(ref, "euler")
    # diffusers 0.42 reaches the final norm through `.text_model`, which transformers 5 dropped; alias it (in
    # __dict__, so torch does not register a module cycle) to run diffusers' own clip_skip code
    ref.text_encoder.__dict__.setdefault("text_model", ref.text_encoder)
    try:
        want = ref("a blue square", num_inference_steps=6, latents=torch.from_numpy(lat), clip_skip=1,
                   guidance_scale=1.0, output_type="np").images
    finally:
        if ref.text_encoder.__dict__.get("text_model") is ref.text_encoder:
            del ref.text_encoder.__dict__["text_model"]
    assert np.abs(got - (want * 255).round() / 255).max() <= TOLERANCE
    plain = pixels(pipes[family].txt2img("a blue square", steps=6, latents=lat, guidance=1.0))
    assert np.abs(plain - got).mean() > 1e-3
    assert "Clip skip: 2" in pipes[family].txt2img("a", steps=1, clip_skip=2)[0].info["parameters"]


def test_clip_skip_out_of_range_is_refused(pipes):
    with pytest.raises(InvalidRequest, match="clip skip must be a whole number from 1 to 2, got 3"):
        pipes["sd1"].txt2img("a", steps=1, clip_skip=3)


def _embedding_file(tmp_path, kind: str, dim: int, seed: int = 0) -> tuple:
    """(path, vectors): a random 2-vector embedding in one of the formats people download."""
    from safetensors.torch import save_file

    vectors = torch.from_numpy(np.random.default_rng(seed).standard_normal((2, dim)).astype(np.float32))
    if kind == "diffusers":
        path = tmp_path / "learned_embeds.safetensors"
        save_file({"<sdrt-cat>": vectors}, str(path))
    elif kind == "a1111-safetensors":
        path = tmp_path / "sdrtcat.safetensors"
        save_file({"emb_params": vectors}, str(path))
    else:  # A1111 .pt: a pickle with a Parameter inside, as its trainer saves it
        path = tmp_path / "sdrtcat.pt"
        torch.save({"string_to_param": {"*": torch.nn.Parameter(vectors)}, "name": "sdrtcat", "step": 500,
                    "string_to_token": {"*": 265}, "sd_checkpoint": "abc"}, str(path))
    return path, vectors.numpy()


@pytest.mark.parametrize("family,kind", [("sd1", "diffusers"), ("sd2", "diffusers"), ("sd1", "a1111-pt"),
                                         ("sd1", "a1111-safetensors")])
def test_textual_inversion_matches_diffusers(bundles, reference, tmp_path, family, kind):
    import sdrt

    pipe = sdrt.Pipeline.load(bundles[family])  # a fresh one: embeddings stay loaded in a pipeline
    dim = pipe.manifest.text_hidden_size
    path, vectors = _embedding_file(tmp_path, kind, dim)
    trigger = pipe.load_embedding(path, allow_pickle=kind == "a1111-pt")
    assert trigger == ("<sdrt-cat>" if kind == "diffusers" else "sdrtcat")
    np.testing.assert_array_equal(pipe.text.embeddings[trigger], vectors)
    prompt, lat = f"a photo of {trigger} on a table", latents(1, seed=6)
    got = pixels(pipe.txt2img(prompt, steps=6, latents=lat))
    ref = reference[family]
    use_scheduler(ref, "euler")
    ref.load_textual_inversion(str(path), token=None if kind == "diffusers" else trigger)
    try:
        want = ref(prompt, num_inference_steps=6, latents=torch.from_numpy(lat), output_type="np").images
    finally:
        ref.unload_textual_inversion()
    assert np.abs(got - (want * 255).round() / 255).max() <= TOLERANCE
    without = pixels(pipe.txt2img("a photo of on a table", steps=6, latents=lat))
    assert np.abs(got - without).mean() > 1e-3, "the embedding should change the image"


def test_embedding_pickles_need_the_flag_and_bad_files_are_refused(pipes, tmp_path):
    pipe = pipes["sd1"]
    path, _ = _embedding_file(tmp_path, "a1111-pt", pipe.manifest.text_hidden_size)
    with pytest.raises(PickleRefused, match="pass --allow-pickle"):
        pipe.load_embedding(path)
    wrong, _ = _embedding_file(tmp_path, "a1111-safetensors", 7)
    with pytest.raises(InvalidRequest, match="vectors of size 7; this model's text encoder takes 32"):
        pipe.load_embedding(wrong)
    evil = tmp_path / "evil.pt"
    torch.save({"string_to_param": {"*": torch.zeros(1, 32)}, "x": __import__("collections").Counter()}, str(evil))
    with pytest.raises(InvalidRequest, match="refusing to load collections.Counter"):
        pipe.load_embedding(evil, allow_pickle=True)
    with pytest.raises(InvalidRequest, match="does not exist"):
        pipe.load_embedding(tmp_path / "missing.safetensors")
