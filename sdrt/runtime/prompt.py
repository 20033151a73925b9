"""AUTOMATIC1111's prompt conventions: emphasis weights, 75-token chunks, BREAK, and the "Original" emphasis.

Reference (stable-diffusion-webui):
* modules/prompt_parser.py: `parse_prompt_attention` and its doctests -> `parse_emphasis`.
* modules/sd_hijack_clip.py: `FrozenCLIPEmbedderWithCustomWordsBase.tokenize_line`, `PromptChunk`, `empty_chunk`,
  `process_tokens` (SD 2.x pad ids) -> `encode_chunks`, `pad_to`; sd_samplers_cfg_denoiser.py `pad_cond_uncond`.
* modules/sd_emphasis.py: `EmphasisOriginal.after_transformers` -> `apply_emphasis`.
* modules/textual_inversion/textual_inversion.py: `find_embedding_at_position` -> embedding slots.

Each chunk of 77 ids goes through the text encoder on its own; the caller concatenates the (77, D) outputs.
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from ..errors import InvalidRequest
from .tokenizer import TruncationWarning

CHUNK_LENGTH = 75      # prompt tokens per chunk; BOS and EOS frame them to 77
COMMA_BACKTRACK = 20   # opts.comma_padding_backtrack default
SLOT_ID = 0            # A1111 feeds id 0 at embedding slots; their input embeddings are replaced later
ROUND, SQUARE = 1.1, 1 / 1.1

# One alternative per syntax element, in A1111's order: escapes, a lone backslash, openers, a ':weight)' closer,
# plain closers, text, a stray ':'.
_ATTENTION = re.compile(r"""
\\\(|\\\)|\\\[|\\]|\\\\|\\|
\(|\[|
:([+-]?[.\d]+)\)|
\)|]|
[^\\()\[\]:]+|
:
""", re.X)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse_emphasis(text: str) -> list[tuple[str, float]]:
    """Split a prompt into (text, weight) runs; a BREAK keyword is the marker ("BREAK", -1)."""
    res: list[list] = []      # [text, weight] pairs, mutable so closing brackets can scale them
    round_open: list[int] = []  # index into res where each unclosed '(' began
    square_open: list[int] = []

    def multiply_from(start: int, factor: float) -> None:
        for item in res[start:]:
            item[1] *= factor

    for m in _ATTENTION.finditer(text):
        piece, weight = m.group(0), m.group(1)
        if piece.startswith("\\"):
            res.append([piece[1:], 1.0])  # a lone backslash becomes "" (A1111 drops it)
        elif piece == "(":
            round_open.append(len(res))
        elif piece == "[":
            square_open.append(len(res))
        elif weight is not None and round_open:
            multiply_from(round_open.pop(), _weight(weight, text))
        elif piece == ")" and round_open:
            multiply_from(round_open.pop(), ROUND)
        elif piece == "]" and square_open:
            multiply_from(square_open.pop(), SQUARE)
        else:  # text, or a closer without an opener (kept literally)
            for i, part in enumerate(_BREAK.split(piece)):
                if i:
                    res.append(["BREAK", -1])
                res.append([part, 1.0])
    # Unbalanced openers apply to the end of the prompt (round first, then square, as A1111 does).
    for start in round_open:
        multiply_from(start, ROUND)
    for start in square_open:
        multiply_from(start, SQUARE)
    if not res:
        res = [["", 1.0]]
    return _merge_equal(res)


def _weight(number: str, prompt: str) -> float:
    try:
        return float(number)
    except ValueError:  # the regex admits "1.2.3" and "."; A1111 crashes there, we say why
        raise InvalidRequest(f"the emphasis weight {number!r} in the prompt {prompt!r} is not a number; "
                             r"write (word:1.2), or escape literal brackets as \( \)") from None


def _merge_equal(res: list[list]) -> list[tuple[str, float]]:
    """Join neighbouring runs of identical weight (exact float equality, as A1111)."""
    out: list[list] = []
    for piece, weight in res:
        if out and out[-1][1] == weight:
            out[-1][0] += piece
        else:
            out.append([piece, weight])
    return [(piece, weight) for piece, weight in out]


class Slot(NamedTuple):
    """One textual-inversion vector: ids[chunk, position] is its placeholder (SLOT_ID)."""
    chunk: int
    position: int  # index into the 77 ids, BOS at 0
    trigger: str
    vector: int    # which of the embedding's vectors


@dataclass(frozen=True)
class Chunks:
    ids: np.ndarray      # (k, 77) int64, ready for the text encoder (SD 2.x pads already applied)
    weights: np.ndarray  # (k, 77) float32 emphasis multipliers, 1.0 at BOS/EOS/padding
    bos_id: int
    eos_id: int
    pad_id: int
    slots: list[Slot] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)


class _Builder:
    """A1111's PromptChunk bookkeeping: the open chunk, its last comma, and the finished chunks."""

    def __init__(self):
        self.done: list[tuple[list[int], list[float], list[tuple[int, str, int]]]] = []
        self.tokens: list[int] = []
        self.weights: list[float] = []
        self.slots: list[tuple[int, str, int]] = []  # (index in tokens, trigger, vector)
        self.last_comma = -1

    def flush(self) -> None:
        """Close the open chunk (padded later) and start an empty one."""
        self.done.append((self.tokens, self.weights, self.slots))
        self.tokens, self.weights, self.slots, self.last_comma = [], [], [], -1

    def backtrack(self) -> None:
        """Move the tokens after the last comma into a fresh chunk, so a phrase is not cut in two."""
        cut = self.last_comma + 1
        tail = (self.tokens[cut:], self.weights[cut:], [(i - cut, t, v) for i, t, v in self.slots if i >= cut])
        self.tokens, self.weights = self.tokens[:cut], self.weights[:cut]
        self.slots = [s for s in self.slots if s[0] < cut]
        self.flush()
        self.tokens, self.weights, self.slots = tail

    def add(self, token: int, weight: float) -> None:
        self.tokens.append(token)
        self.weights.append(weight)

    def add_embedding(self, trigger: str, vectors: int, weight: float) -> None:
        if len(self.tokens) + vectors > CHUNK_LENGTH:
            self.flush()  # an embedding never straddles two chunks
        for v in range(vectors):
            self.slots.append((len(self.tokens), trigger, v))
            self.add(SLOT_ID, weight)


def fragment_ids(tokenizer, text: str) -> list[int]:
    """Token ids of `text` without BOS/EOS, as transformers' tokenizer(add_special_tokens=False)."""
    return tokenizer.token_ids(text)[1:-1]


def _trigger_table(tokenizer, embeddings: dict[str, int] | None) -> dict[int, list[tuple[list[int], str, int]]]:
    """first token id -> [(trigger ids, trigger, vectors)], longest first, as A1111's ids_lookup."""
    table: dict[int, list[tuple[list[int], str, int]]] = {}
    for trigger, vectors in (embeddings or {}).items():
        ids = fragment_ids(tokenizer, trigger)
        if not ids:
            raise InvalidRequest(f"the embedding trigger {trigger!r} has no tokens; name it with a word")
        if not 1 <= vectors <= CHUNK_LENGTH:
            raise InvalidRequest(f"the embedding {trigger!r} has {vectors} vectors; "
                                 f"a prompt chunk holds 1 to {CHUNK_LENGTH}")
        table.setdefault(ids[0], []).append((ids, trigger, vectors))
    for entries in table.values():
        entries.sort(key=lambda e: len(e[0]), reverse=True)
    return table


def _match(table, ids: list[int], pos: int):
    for trigger_ids, trigger, vectors in table.get(ids[pos], ()):
        if ids[pos:pos + len(trigger_ids)] == trigger_ids:
            return trigger_ids, trigger, vectors
    return None


def encode_chunks(tokenizer, text: str, emphasis: bool = True,
                  embeddings: dict[str, int] | None = None, truncate: bool = False) -> Chunks:
    """A prompt as k chunks of 77 ids and weights (A1111 tokenize_line + process_tokens).

    emphasis=False is A1111's "None" option: brackets and BREAK are plain text, every weight 1.
    embeddings maps a textual-inversion trigger word to its number of vectors; its tokens (matched within one
    weighted fragment) become that many SLOT_ID placeholders, listed in Chunks.slots.
    truncate=True keeps one chunk and drops what does not fit, with a TruncationWarning, as diffusers does.
    """
    parsed = parse_emphasis(text) if emphasis else [(text, 1.0)]
    comma = fragment_ids(tokenizer, ",")[0]  # ",</w>"
    table = _trigger_table(tokenizer, embeddings)
    b, dropped = _Builder(), []
    for fragment, weight in parsed:
        if fragment == "BREAK" and weight == -1:
            if not truncate:
                b.flush()
            continue
        ids = fragment_ids(tokenizer, fragment)  # per fragment: "hou(se)" is "hou" + "se", not "house"
        pos = 0
        while pos < len(ids):
            found = _match(table, ids, pos)
            width = found[2] if found else 1
            if truncate and (dropped or len(b.tokens) + width > CHUNK_LENGTH):
                dropped += ids[pos:]
                break
            if ids[pos] == comma:
                b.last_comma = len(b.tokens)
            elif (len(b.tokens) == CHUNK_LENGTH and b.last_comma != -1
                  and CHUNK_LENGTH - b.last_comma <= COMMA_BACKTRACK):
                b.backtrack()
            if len(b.tokens) == CHUNK_LENGTH:
                b.flush()
            if found is None:
                b.add(ids[pos], weight)
                pos += 1
            else:
                trigger_ids, trigger, vectors = found
                b.add_embedding(trigger, vectors, weight)
                pos += len(trigger_ids)
    if b.tokens or not b.done:  # a trailing BREAK adds no empty chunk; an empty prompt still gets one
        b.flush()
    if dropped:
        warnings.warn(TruncationWarning(
            f"the prompt is longer than CLIP's {CHUNK_LENGTH} tokens and --truncate is on; this part was "
            f"dropped: {tokenizer.decode(dropped)!r}"), stacklevel=2)
    return _assemble(b.done, tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id)


def _assemble(done, bos: int, eos: int, pad: int) -> Chunks:
    k, width = len(done), CHUNK_LENGTH + 2
    ids = np.full((k, width), eos, dtype=np.int64)  # (k, 77): A1111 pads with EOS first
    weights = np.ones((k, width), dtype=np.float32)
    slots = []
    for c, (tokens, mults, chunk_slots) in enumerate(done):
        ids[c, 0] = bos
        ids[c, 1:1 + len(tokens)] = tokens
        weights[c, 1:1 + len(mults)] = mults
        slots += [Slot(c, 1 + i, trigger, v) for i, trigger, v in chunk_slots]
    _apply_pad(ids, eos, pad)
    return Chunks(ids, weights, bos, eos, pad, slots)


def _apply_pad(ids: np.ndarray, eos: int, pad: int) -> None:
    """SD 2.x (pad != EOS): everything after each row's first EOS becomes the pad id (process_tokens)."""
    if pad == eos:
        return
    for row in ids:  # (77,)
        first_eos = int(np.argmax(row == eos))  # every row has an EOS at 76 at the latest
        row[first_eos + 1:] = pad


def pad_to(chunks: Chunks, k: int) -> Chunks:
    """Append empty-prompt chunks up to k, as A1111's pad_cond_uncond pads the shorter of cond/uncond."""
    if k < len(chunks):
        raise ValueError(f"cannot pad {len(chunks)} chunks down to {k}")
    if k == len(chunks):
        return chunks
    empty = np.full((k - len(chunks), CHUNK_LENGTH + 2), chunks.eos_id, dtype=np.int64)  # (extra, 77)
    empty[:, 0] = chunks.bos_id
    _apply_pad(empty, chunks.eos_id, chunks.pad_id)
    return Chunks(np.concatenate([chunks.ids, empty]),
                  np.concatenate([chunks.weights, np.ones(empty.shape, dtype=np.float32)]),
                  chunks.bos_id, chunks.eos_id, chunks.pad_id, list(chunks.slots))


def apply_emphasis(z: np.ndarray, weights: np.ndarray, chunk_width: int = CHUNK_LENGTH + 2) -> np.ndarray:
    """A1111 "Original" emphasis: scale each token's hidden state by its weight, then restore the mean.

    z: (k*77, D) or (N, k*77, D) text-encoder output; weights: anything reshaping to z.shape[:-1].
    A1111 runs process_tokens once per 77-token chunk and one prompt per call, so the mean it restores is that
    of one chunk of one prompt: here, per sample and per chunk.
    """
    z = np.asarray(z, dtype=np.float32)
    w = np.asarray(weights, dtype=np.float32).reshape(z.shape[:-1])
    t, d = z.shape[-2:]
    if t % chunk_width:
        raise ValueError(f"z has {t} tokens, not a multiple of the {chunk_width}-token chunk")
    lead = z.shape[:-2]
    zc = z.reshape(lead + (t // chunk_width, chunk_width, d))  # (..., k, 77, D)
    wc = w.reshape(lead + (t // chunk_width, chunk_width, 1))   # (..., k, 77, 1)
    original_mean = zc.mean(axis=(-2, -1), keepdims=True, dtype=np.float64)
    scaled = zc * wc
    # "restoring original mean is likely not correct, but it seems to work well" (sd_emphasis.py)
    factor = original_mean / scaled.mean(axis=(-2, -1), keepdims=True, dtype=np.float64)
    return (scaled * factor.astype(np.float32)).reshape(z.shape)
