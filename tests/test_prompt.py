"""A1111 prompt conventions: emphasis parsing (its doctests), 75-token chunks, BREAK, SD 2.x pads, emphasis math."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import sdrt.export
from sdrt.errors import InvalidRequest
from sdrt.runtime.prompt import (SLOT_ID, Chunks, Slot, apply_emphasis, encode_chunks, fragment_ids, pad_to,
                                 parse_emphasis)
from sdrt.runtime.tokenizer import ClipTokenizer, load_tokenizer_files

VOCAB = Path(sdrt.export.__file__).parent / "clip_tokenizer"
BOS, EOS, A, COMMA = 49406, 49407, 320, 267  # "a</w>" and ",</w>" are one token each


@pytest.fixture(scope="module")
def sd1():
    return ClipTokenizer(load_tokenizer_files(VOCAB), 77, EOS)


@pytest.fixture(scope="module")
def sd2():
    return ClipTokenizer(load_tokenizer_files(VOCAB), 77, 0)


def words(n: int, word: str = "a") -> str:
    return " ".join([word] * n)


def body(chunks: Chunks, c: int) -> list[int]:
    """The prompt tokens of chunk c: between BOS and the first EOS."""
    row = chunks.ids[c].tolist()
    assert row[0] == BOS
    return row[1:row.index(EOS)]


# --- parse_emphasis: every doctest of A1111's parse_prompt_attention, then the edges -------------------------

DOCTESTS = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    (r"\(literal\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
]

EDGES = [
    ("", [("", 1.0)]),
    ("[x]", [("x", 1 / 1.1)]),
    ("[[x]]", [("x", 1 / 1.1 / 1.1)]),
    ("(x:1.3)", [("x", 1.3)]),
    ("((x:1.3))", [("x", 1.3 * 1.1)]),
    ("(x:+.5) y", [("x", 0.5), (" y", 1.0)]),
    ("[unbalanced", [("unbalanced", 1 / 1.1)]),
    ("a) b] c:d", [("a) b] c:d", 1.0)]),          # closers without openers and ':' are text
    ("x:1.3) y", [("x:1.3) y", 1.0)]),            # a weight needs an open '('
    (r"\\ \) \[ \]", [("\\ ) [ ]", 1.0)]),
    (r"(\(x\))", [("(x)", 1.1)]),                 # escaped brackets inside emphasis take its weight
    (r"a\b", [("ab", 1.0)]),                      # a lone backslash is dropped
    ("a BREAK b", [("a", 1.0), ("BREAK", -1), ("b", 1.0)]),
    ("a\nBREAK\tb", [("a", 1.0), ("BREAK", -1), ("b", 1.0)]),
    ("a break b, BREAKFAST", [("a break b, BREAKFAST", 1.0)]),  # case-sensitive, whole word
    ("(a BREAK b)", [("a", 1.1), ("BREAK", -1.1), ("b", 1.1)]),  # inside brackets it is scaled: no longer a marker
]


@pytest.mark.parametrize("text,want", DOCTESTS + EDGES)
def test_parse_emphasis(text, want):
    got = parse_emphasis(text)
    assert [t for t, _ in got] == [t for t, _ in want]
    assert [w for _, w in got] == pytest.approx([w for _, w in want])


def test_a_weight_that_is_no_number_is_refused():
    with pytest.raises(InvalidRequest, match="1.2.3"):
        parse_emphasis("(x:1.2.3)")


# --- encode_chunks -------------------------------------------------------------------------------------------

def test_a_short_prompt_is_one_framed_chunk(sd1):
    c = encode_chunks(sd1, "a photo")
    ids = fragment_ids(sd1, "a photo")
    assert c.ids.shape == (1, 77) and c.ids.dtype == np.int64
    assert c.weights.shape == (1, 77) and c.weights.dtype == np.float32
    assert c.ids[0].tolist() == [BOS] + ids + [EOS] * (76 - len(ids))
    assert (c.weights == 1).all() and c.slots == []


def test_an_empty_prompt_is_one_chunk(sd1, sd2):
    assert encode_chunks(sd1, "").ids.tolist() == [[BOS] + [EOS] * 76]
    assert encode_chunks(sd2, "").ids.tolist() == [[BOS, EOS] + [0] * 75]


def test_weights_follow_the_fragments(sd1):
    c = encode_chunks(sd1, "a (cat:1.5) [dog]")
    cat, dog = fragment_ids(sd1, "cat")[0], fragment_ids(sd1, "dog")[0]
    assert body(c, 0) == [A, cat, dog]
    assert c.weights[0, :5].tolist() == pytest.approx([1.0, 1.0, 1.5, 1 / 1.1, 1.0])


def test_each_fragment_is_tokenized_on_its_own(sd1):
    c = encode_chunks(sd1, "hou(se)")
    assert body(c, 0) == fragment_ids(sd1, "hou") + fragment_ids(sd1, "se") != fragment_ids(sd1, "house")
    assert c.weights[0, 1:3].tolist() == pytest.approx([1.0, 1.1])


def test_escaped_brackets_are_text(sd1):
    c = encode_chunks(sd1, r"\(cat\)")
    assert body(c, 0) == fragment_ids(sd1, "(cat)") and (c.weights == 1).all()


def test_without_emphasis_brackets_and_break_are_literal(sd1):
    text = "(cat:1.5) BREAK [dog]"
    c = encode_chunks(sd1, text, emphasis=False)
    assert len(c) == 1 and body(c, 0) == fragment_ids(sd1, text) and (c.weights == 1).all()


@pytest.mark.parametrize("n,k", [(1, 1), (75, 1), (76, 2), (150, 2), (151, 3)])
def test_chunks_hold_75_tokens(sd1, n, k):
    c = encode_chunks(sd1, words(n))
    assert len(c) == k
    assert sum(len(body(c, i)) for i in range(k)) == n
    assert all(len(body(c, i)) == 75 for i in range(k - 1))
    assert (c.ids[:, 0] == BOS).all() and (c.ids[:, -1] == EOS).all()


def test_a_comma_within_20_tokens_of_the_end_moves_the_tail(sd1):
    # comma at chunk index 55: 75 - 55 = 20 -> the 19 tokens after it start the next chunk
    c = encode_chunks(sd1, words(55) + ", " + words(30))
    assert body(c, 0) == [A] * 55 + [COMMA]
    assert body(c, 1) == [A] * 30
    assert c.ids[0, 57:].tolist() == [EOS] * 20


def test_a_comma_farther_than_20_tokens_does_not_move(sd1):
    c = encode_chunks(sd1, words(54) + ", " + words(30))  # comma at index 54: 21 from the end
    assert body(c, 0) == [A] * 54 + [COMMA] + [A] * 20
    assert body(c, 1) == [A] * 10


def test_backtrack_only_when_the_chunk_overflows(sd1):
    c = encode_chunks(sd1, words(60) + ", " + words(14))  # exactly 75 tokens: one chunk, no move
    assert len(c) == 1 and len(body(c, 0)) == 75


def test_a_comma_ending_the_chunk_moves_nothing(sd1):
    c = encode_chunks(sd1, words(74) + ", " + words(3))
    assert body(c, 0) == [A] * 74 + [COMMA] and body(c, 1) == [A] * 3


def test_the_backtrack_carries_weights(sd1):
    c = encode_chunks(sd1, words(60) + ", (" + words(20) + ":1.4)")
    assert body(c, 1) == [A] * 20
    assert c.weights[1, 1:21].tolist() == pytest.approx([1.4] * 20)
    assert (c.weights[0] == 1).all()


def test_break_starts_a_new_chunk(sd1):
    c = encode_chunks(sd1, "a BREAK a, a")
    assert len(c) == 2 and body(c, 0) == [A] and body(c, 1) == [A, COMMA, A]


def test_break_at_the_ends(sd1):
    assert len(encode_chunks(sd1, "a BREAK")) == 1           # a trailing BREAK adds nothing
    c = encode_chunks(sd1, "BREAK a")                        # a leading one leaves an empty first chunk
    assert len(c) == 2 and body(c, 0) == [] and body(c, 1) == [A]
    assert len(encode_chunks(sd1, "a BREAK BREAK a")) == 3


def test_sd2_pads_after_the_first_eos_with_its_pad_id(sd1, sd2):
    one, two = encode_chunks(sd1, "a photo BREAK a"), encode_chunks(sd2, "a photo BREAK a")
    assert one.ids[0].tolist() == [BOS, A, 1125, EOS] + [EOS] * 73
    assert two.ids[0].tolist() == [BOS, A, 1125, EOS] + [0] * 73
    assert two.ids[1].tolist() == [BOS, A, EOS] + [0] * 74
    full = encode_chunks(sd2, words(76))
    assert full.ids[0].tolist() == [BOS] + [A] * 75 + [EOS]
    np.testing.assert_array_equal(one.weights, two.weights)


@pytest.mark.parametrize("tok", ["sd1", "sd2"])
def test_pad_to_appends_empty_prompt_chunks(request, tok):
    tokenizer = request.getfixturevalue(tok)
    neg = encode_chunks(tokenizer, "blurry")
    padded = pad_to(neg, 3)
    empty = encode_chunks(tokenizer, "")
    assert padded.ids.shape == (3, 77) and padded.weights.shape == (3, 77)
    np.testing.assert_array_equal(padded.ids[0], neg.ids[0])
    np.testing.assert_array_equal(padded.ids[1:], np.repeat(empty.ids, 2, axis=0))
    assert padded.ids.dtype == np.int64 and (padded.weights[1:] == 1).all()
    assert pad_to(neg, 1) is neg
    with pytest.raises(ValueError):
        pad_to(padded, 2)


# --- textual-inversion slots ---------------------------------------------------------------------------------

def test_an_embedding_becomes_its_vector_slots(sd1):
    c = encode_chunks(sd1, "a (my-style:1.2) a", embeddings={"my-style": 3})
    assert len(fragment_ids(sd1, "my-style")) == 3  # the trigger is matched as its token sequence
    assert c.slots == [Slot(0, 2 + v, "my-style", v) for v in range(3)]
    assert body(c, 0) == [A, SLOT_ID, SLOT_ID, SLOT_ID, A]
    assert c.weights[0, 2:5].tolist() == pytest.approx([1.2] * 3)


def test_the_longest_trigger_wins(sd1):
    c = encode_chunks(sd1, "cat girl, cat", embeddings={"cat": 1, "cat girl": 2})
    assert [(s.trigger, s.position) for s in c.slots] == [("cat girl", 1), ("cat girl", 2), ("cat", 4)]
    assert body(c, 0) == [SLOT_ID, SLOT_ID, COMMA, SLOT_ID]


def test_a_trigger_split_by_brackets_is_no_trigger(sd1):
    assert encode_chunks(sd1, "cat (girl)", embeddings={"cat girl": 2}).slots == []


def test_an_embedding_never_straddles_chunks(sd1):
    c = encode_chunks(sd1, words(73) + " emb", embeddings={"emb": 3})
    assert body(c, 0) == [A] * 73
    assert c.slots == [Slot(1, 1 + v, "emb", v) for v in range(3)]


def test_the_comma_backtrack_moves_slots_too(sd1):
    c = encode_chunks(sd1, words(60) + ", " + words(10) + " emb " + words(5), embeddings={"emb": 2})
    assert body(c, 0) == [A] * 60 + [COMMA]
    assert body(c, 1) == [A] * 10 + [SLOT_ID] * 2 + [A] * 5
    assert c.slots == [Slot(1, 11, "emb", 0), Slot(1, 12, "emb", 1)]


@pytest.mark.parametrize("emb", [{"emb": 0}, {"emb": 76}, {" ": 1}])
def test_impossible_embeddings_are_refused(sd1, emb):
    with pytest.raises(InvalidRequest):
        encode_chunks(sd1, "emb", embeddings=emb)


# --- against transformers' CLIPTokenizer (what A1111 calls per fragment) -------------------------------------

CORPUS = [
    "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
    "masterpiece, best quality, (ultra detailed:1.2), [blurry], 8k BREAK portrait of a naïve café owner",
    r"hou(se) \(escaped\) don't [stop:0.5] émoji 🐱🚀",
    ", ".join(["best quality", "ultra detailed", "(sharp focus:1.1)", "8k"] * 15),
]


@pytest.mark.parametrize("text", CORPUS)
def test_fragment_tokens_equal_transformers(sd1, text):
    transformers = pytest.importorskip("transformers")
    reference = transformers.CLIPTokenizer.from_pretrained(str(VOCAB))
    fragments = [t for t, w in parse_emphasis(text) if not (t == "BREAK" and w == -1)]
    want = [i for ids in reference(fragments, add_special_tokens=False)["input_ids"] for i in ids]
    assert [fragment_ids(sd1, t) for t in fragments] == reference(fragments, add_special_tokens=False)["input_ids"]
    c = encode_chunks(sd1, text)
    assert [i for k in range(len(c)) for i in body(c, k)] == want


# --- apply_emphasis ------------------------------------------------------------------------------------------

def test_apply_emphasis_is_a1111_original_on_one_chunk():
    rng = np.random.default_rng(0)
    z = (rng.standard_normal((77, 8)) + 0.5).astype(np.float32)
    w = np.ones(77, np.float32)
    w[5] = 1.5
    out = apply_emphasis(z, w)
    scaled = z * w[:, None]
    np.testing.assert_allclose(out, scaled * (z.mean() / scaled.mean()), rtol=1e-5)
    assert out.mean() == pytest.approx(z.mean(), rel=1e-5)
    ratio = (out[5] / out[3]) / (z[5] / z[3])
    np.testing.assert_allclose(ratio, 1.5, rtol=1e-5)  # the weighted token gains 1.5x relative to the others
    assert out.dtype == np.float32


def test_apply_emphasis_with_weights_one_changes_nothing():
    z = np.random.default_rng(1).standard_normal((2, 154, 4)).astype(np.float32)
    np.testing.assert_allclose(apply_emphasis(z, np.ones((2, 2, 77))), z, rtol=1e-5, atol=1e-6)


def test_apply_emphasis_keeps_each_chunks_mean(sd1):
    c = encode_chunks(sd1, "(a:1.5) BREAK [a]")
    rng = np.random.default_rng(2)
    z = (rng.standard_normal((3, 154, 16)) + 1).astype(np.float32)  # (N, k*77, D)
    out = apply_emphasis(z, np.broadcast_to(c.weights.reshape(1, 154), (3, 154)))
    assert out.shape == z.shape
    for chunk in (slice(0, 77), slice(77, 154)):
        np.testing.assert_allclose(out[:, chunk].mean(axis=(1, 2)), z[:, chunk].mean(axis=(1, 2)), rtol=1e-5)
    flat = apply_emphasis(z[0], c.weights)  # (k*77, D) with (k, 77) weights
    np.testing.assert_allclose(flat, out[0], rtol=1e-6)


def test_apply_emphasis_wants_whole_chunks():
    with pytest.raises(ValueError):
        apply_emphasis(np.ones((76, 4), np.float32), np.ones(76))
