"""CLIP's byte-level BPE tokenizer through the `tokenizers` library (no transformers at run time).

Ids equal transformers' `CLIPTokenizer` for SD 1.x (padded with <|endoftext|>) and SD 2.x (padded with `!`,
id 0); the test suite checks that on a corpus. A prompt longer than the text encoder's window is truncated
as diffusers truncates it (keep BOS + the first max_length-2 tokens + EOS) with a warning naming the dropped words.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from ..errors import BundleCorrupt

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# The pre-tokenizer regex of CLIP's reference implementation (openai/CLIP simple_tokenizer.py), special tokens first.
_CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


class TruncationWarning(UserWarning):
    pass


def build_clip_tokenizer(vocab_file: Path, merges_file: Path) -> Tokenizer:
    """CLIP's pipeline: NFC, collapse whitespace, lowercase; split like CLIP; BPE with </w>; BOS ... EOS."""
    vocab = json.loads(Path(vocab_file).read_text(encoding="utf-8"))
    lines = Path(merges_file).read_text(encoding="utf-8").splitlines()
    merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=EOS, continuing_subword_prefix="",
                               end_of_word_suffix="</w>", fuse_unk=False))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([BOS, EOS])
    tok.post_processor = processors.RobertaProcessing((EOS, vocab[EOS]), (BOS, vocab[BOS]),  # (sep, cls)
                                                      trim_offsets=False, add_prefix_space=False)
    return tok


def _special_token(folder: Path, key: str) -> str | None:
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = folder / name
        if path.exists():
            value = json.loads(path.read_text(encoding="utf-8")).get(key)
            if isinstance(value, dict):
                value = value.get("content")
            if value:
                return value
    return None


def load_tokenizer_files(folder: Path) -> Tokenizer:
    """tokenizer.json when the folder has one, else vocab.json + merges.txt (the published SD layout)."""
    folder = Path(folder)
    try:
        if (folder / "tokenizer.json").exists():
            return Tokenizer.from_file(str(folder / "tokenizer.json"))
        tok = build_clip_tokenizer(folder / "vocab.json", folder / "merges.txt")
        pad = _special_token(folder, "pad_token")
        if pad and pad not in (BOS, EOS):  # SD 2.x pads with "!": transformers makes it a special token, so "!!"
            tok.add_special_tokens([pad])  # splits into two of them instead of merging into one
        return tok
    except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception on a bad file
        raise BundleCorrupt(f"tokenizer files in {str(folder)!r} are missing or unreadable ({e}); "
                            "the folder needs tokenizer.json or vocab.json + merges.txt") from None


def read_pad_id(folder: Path) -> int:
    """SD 1.x pads with <|endoftext|>, SD 2.x with '!'; the folder's special-token files say which."""
    tok = load_tokenizer_files(folder)
    pad = _special_token(Path(folder), "pad_token") or EOS
    pad_id = tok.token_to_id(pad)
    if pad_id is None:
        raise BundleCorrupt(f"pad token {pad!r} of {str(folder)!r} is not in its vocabulary")
    return pad_id


class ClipTokenizer:
    def __init__(self, tokenizer: Tokenizer, max_length: int = 77, pad_id: int | None = None):
        self._tok = tokenizer
        self.max_length = max_length
        self.bos_id = tokenizer.token_to_id(BOS)
        self.eos_id = tokenizer.token_to_id(EOS)
        self.pad_id = self.eos_id if pad_id is None else pad_id

    @classmethod
    def from_folder(cls, folder: Path, max_length: int, pad_id: int) -> "ClipTokenizer":
        return cls(load_tokenizer_files(folder), max_length, pad_id)

    def save(self, path: Path) -> None:
        """Write the tokenizer.json the runtime loads."""
        self._tok.save(str(path))

    def token_ids(self, prompt: str) -> list[int]:
        """BOS + tokens + EOS, untruncated."""
        return self._tok.encode(prompt).ids

    def decode(self, ids: list[int]) -> str:
        """Ids back to text; CLIP marks word ends with </w>, which the byte-level decoder leaves in."""
        return " ".join(self._tok.decode(ids).replace("</w>", " ").split())

    def __call__(self, prompts: list[str]) -> np.ndarray:
        """(N, max_length) int64 ids, truncated and padded as diffusers does."""
        out = np.full((len(prompts), self.max_length), self.pad_id, dtype=np.int64)
        for row, prompt in enumerate(prompts):
            ids = self.token_ids(prompt)
            if len(ids) > self.max_length:
                dropped = self.decode(ids[self.max_length - 1:-1])
                warnings.warn(TruncationWarning(
                    f"the prompt is longer than CLIP's {self.max_length - 2} tokens; this part was dropped: "
                    f"{dropped!r}"), stacklevel=2)
                ids = ids[: self.max_length - 1] + [self.eos_id]
            out[row, : len(ids)] = ids
        return out
