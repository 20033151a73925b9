"""Prompt -> conditioning: A1111 prompt syntax and chunks, the token-embedding lookup (where textual-inversion
vectors go in), CLIP, clip skip, emphasis. The U-Net sees (77·k, D) per prompt.

The text encoder graph sdrt exports takes token embeddings, not ids, so the lookup table lives here
(`text_encoder/token_embeddings.npy`) and an embedding file needs no re-export. A graph that takes input_ids
(an optimum export, or a bundle of format 1) still runs, without textual inversion or clip skip.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import BundleCorrupt, InvalidRequest
from . import names
from .engines.base import Engine
from .hypernetworks import strip_tags
from .lora import parse_tags
from .prompt import Chunks, apply_emphasis, encode_chunks, pad_to
from .tokenizer import ClipTokenizer


@dataclass(frozen=True)
class TextOptions:
    emphasis: bool = True  # A1111's (word:1.3) syntax; off: brackets are plain text
    truncate: bool = False  # one 77-token chunk, the rest dropped (diffusers' behaviour) instead of chunks
    clip_skip: int = 1  # A1111's numbering: 1 = the last layer, 2 = the one before (diffusers' clip_skip=1)


@dataclass
class TextEncoder:
    engines: dict[str, Engine]  # the pipeline's, so the text encoder is looked up at each use
    tokenizer: ClipTokenizer
    table: np.ndarray | None  # (vocab, D) token embeddings, None when the graph takes input_ids
    embeddings: dict[str, np.ndarray] = field(default_factory=dict)  # trigger -> (n, D) textual-inversion vectors

    @property
    def engine(self) -> Engine:
        return self.engines[names.TEXT_ENCODER]

    @property
    def takes_embeddings(self) -> bool:
        return names.INPUTS_EMBEDS in self.engine.inputs

    @property
    def layers(self) -> int:
        spec = self.engine.outputs.get(names.HIDDEN_STATES)
        return int(spec.shape[1]) - 1 if spec is not None and isinstance(spec.shape[1], int) else 1

    def encode(self, prompts: list[str], options: TextOptions) -> np.ndarray:
        """(N, 77·k, D): every prompt padded with empty chunks to the longest one's k, as A1111 pads
        cond and uncond so they share one U-Net batch."""
        self._check(options)
        vectors = {t: len(v) for t, v in self.embeddings.items()} if self.takes_embeddings else None
        prompts = [strip_tags(parse_tags(p)[0]) for p in prompts]  # <lora:...>, <hypernet:...>: not text
        chunks = [encode_chunks(self.tokenizer, p, options.emphasis, vectors, options.truncate) for p in prompts]
        k = max(len(c) for c in chunks)
        chunks = [pad_to(c, k) for c in chunks]
        hidden = self._run(chunks, options.clip_skip)  # (N·k, 77, D)
        out = hidden.reshape(len(prompts), k * hidden.shape[1], hidden.shape[2])  # (N, 77·k, D)
        weights = np.stack([c.weights.reshape(-1) for c in chunks])  # (N, 77·k)
        return apply_emphasis(out, weights) if (weights != 1).any() else out

    def _check(self, options: TextOptions) -> None:
        if not self.takes_embeddings and options.clip_skip != 1:
            raise InvalidRequest("clip skip needs a text encoder that returns every layer; this bundle's (an "
                                 "optimum export or an older sdrt bundle) does not: re-export it with `sdrt export`")
        if not 1 <= options.clip_skip <= self.layers:
            raise InvalidRequest(f"clip skip must be from 1 to {self.layers} (this text encoder's layers), "
                                 f"got {options.clip_skip!r}")

    def _run(self, chunks: list[Chunks], clip_skip: int) -> np.ndarray:
        ids = np.concatenate([c.ids for c in chunks])  # (N·k, 77)
        if not self.takes_embeddings:
            return self.engine(**{names.INPUT_IDS: ids})[names.LAST_HIDDEN_STATE].astype(np.float32)
        embeds = self.table[ids]  # (N·k, 77, D)
        for n, c in enumerate(chunks):
            row = n * len(c)
            for slot in c.slots:
                embeds[row + slot.chunk, slot.position] = self.embeddings[slot.trigger][slot.vector]
        out = self.engine(**{names.INPUTS_EMBEDS: embeds})
        if clip_skip == 1:
            return out[names.LAST_HIDDEN_STATE].astype(np.float32)
        return out[names.HIDDEN_STATES][:, -clip_skip].astype(np.float32)  # (N·k, 77, D), final norm applied


def load_token_embeddings(path: Path, manifest) -> np.ndarray:
    """The bundle's (vocab, D) lookup table, memory-mapped (hashed with the rest of the bundle at load)."""
    table_path = path / manifest.token_embeddings
    try:
        table = np.load(table_path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise BundleCorrupt(f"{str(table_path)!r} is not a readable numpy array ({e}); re-export the bundle") from None
    if table.ndim != 2 or table.shape[1] != manifest.text_hidden_size:
        raise BundleCorrupt(f"{str(table_path)!r} has shape {table.shape}, expected (vocab, "
                            f"{manifest.text_hidden_size}); re-export the bundle")
    return table
