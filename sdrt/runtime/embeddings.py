"""Textual-inversion embedding files, read with numpy (no torch at run time).

Formats (Gal et al. 2022, "An Image is Worth One Word"):
* diffusers' `learned_embeds.safetensors` / `.bin`: {trigger: (D,) or (n, D)}; the trigger is the key.
* AUTOMATIC1111's `.safetensors`: {"emb_params": (n, D)}; its `.pt`: {"string_to_param": {"*": (n, D)}, ...};
  the trigger is the file name without its extension, as A1111 names it.
`.pt`/`.bin` files are pickles, which can run code when loaded: they are read only with `allow_pickle`, and
then by a restricted unpickler that rebuilds tensors into numpy and refuses every other class.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import InvalidRequest, PickleRefused
from .torch_pickle import read_torch_pickle

SAFETENSORS = (".safetensors",)
PICKLES = (".pt", ".bin", ".ckpt")


def load_embedding(path: str | Path, hidden_size: int, trigger: str | None = None,
                   allow_pickle: bool = False) -> dict[str, np.ndarray]:
    """{trigger: (n, D) float32 vectors}. `trigger` overrides the name the file gives."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise InvalidRequest(f"embedding file {str(path)!r} does not exist")
    if path.suffix.lower() in SAFETENSORS:
        data = _read_safetensors(path)
    elif path.suffix.lower() in PICKLES:
        if not allow_pickle:
            raise PickleRefused(f"{str(path)!r} is a pickle, which can run arbitrary code when loaded; pass "
                                "--allow-pickle (allow_pickle=True) if you trust it, or use a .safetensors file")
        data = read_torch_pickle(path, "embedding")
    else:
        raise InvalidRequest(f"embedding file {str(path)!r} is not .safetensors, .pt or .bin")
    name, vectors = _vectors(data, path)
    vectors = np.asarray(vectors, dtype=np.float32).reshape(-1, np.shape(vectors)[-1])  # (n, D)
    if vectors.shape[1] != hidden_size:
        raise InvalidRequest(f"embedding {str(path)!r} has vectors of size {vectors.shape[1]}; this model's text "
                             f"encoder takes {hidden_size} (an embedding for another Stable Diffusion version?)")
    if not np.isfinite(vectors).all():
        raise InvalidRequest(f"embedding {str(path)!r} contains NaN or Inf")
    return {trigger or name: vectors}


def _vectors(data: dict, path: Path) -> tuple[str, np.ndarray]:
    if "string_to_param" in data:  # A1111 .pt
        params = data["string_to_param"]
        return path.stem, next(iter(params.values()))
    if "emb_params" in data:  # A1111 .safetensors
        return path.stem, data["emb_params"]
    if {"clip_l", "clip_g"} & set(data):
        raise InvalidRequest(f"embedding {str(path)!r} is for SDXL (clip_l/clip_g), not Stable Diffusion 1.x/2.x")
    arrays = {k: v for k, v in data.items() if isinstance(v, np.ndarray)}
    if len(arrays) != 1:
        raise InvalidRequest(f"embedding {str(path)!r} holds {len(arrays)} tensors ({', '.join(arrays)[:200]}); "
                             "expected one (diffusers), emb_params or string_to_param (A1111)")
    return next(iter(arrays.items()))


def _read_safetensors(path: Path) -> dict:
    from safetensors.numpy import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for a malformed header
        raise InvalidRequest(f"embedding {str(path)!r} is not a readable safetensors file ({e})") from None
