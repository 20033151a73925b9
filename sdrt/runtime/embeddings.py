"""Textual-inversion embedding files, read with numpy (no torch at run time).

Formats (Gal et al. 2022, "An Image is Worth One Word"):
* diffusers' `learned_embeds.safetensors` / `.bin`: {trigger: (D,) or (n, D)}; the trigger is the key.
* AUTOMATIC1111's `.safetensors`: {"emb_params": (n, D)}; its `.pt`: {"string_to_param": {"*": (n, D)}, ...};
  the trigger is the file name without its extension, as A1111 names it.
`.pt`/`.bin` files are pickles, which can run code when loaded: they are read only with `allow_pickle`, and
then by a restricted unpickler that rebuilds tensors into numpy and refuses every other class.
"""
from __future__ import annotations

import collections
import pickle
import zipfile
from pathlib import Path

import numpy as np

from ..errors import InvalidRequest, PickleRefused

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
        data = _read_torch_pickle(path)
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


# torch.save's zip format: <name>/data.pkl references storages stored as raw bytes in <name>/data/<key>.
_STORAGES = {"FloatStorage": np.float32, "HalfStorage": np.float16, "DoubleStorage": np.float64,
             "BFloat16Storage": "bfloat16", "LongStorage": np.int64, "IntStorage": np.int32}


def _rebuild_tensor(storage, offset, size, stride, *_):
    itemsize = storage.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(storage[offset:], shape=tuple(size),
                                           strides=tuple(s * itemsize for s in stride))
    return np.array(view)  # own the memory


class _TensorUnpickler(pickle.Unpickler):
    """Rebuilds tensors and plain containers; any other global (the code-execution route) is refused."""

    def __init__(self, file, archive: zipfile.ZipFile, prefix: str):
        super().__init__(file)
        self.archive, self.prefix = archive, prefix

    def find_class(self, module, name):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("torch._utils", "_rebuild_parameter"):
            return lambda tensor, *_: tensor
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch" and name in _STORAGES:
            return name
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from an embedding pickle")

    def persistent_load(self, pid):
        _, storage_type, key, _location, _numel = pid  # ('storage', type, key, location, numel)
        raw = self.archive.read(f"{self.prefix}/data/{key}")
        if _STORAGES[storage_type] == "bfloat16":  # numpy has no bfloat16: widen to float32 by bits
            return (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32)
        return np.frombuffer(raw, _STORAGES[storage_type])


def _read_torch_pickle(path: Path) -> dict:
    try:
        with zipfile.ZipFile(path) as archive:
            pkl = next(n for n in archive.namelist() if n.endswith("/data.pkl"))
            with archive.open(pkl) as f:
                data = _TensorUnpickler(f, archive, pkl.rsplit("/", 1)[0]).load()
    except (zipfile.BadZipFile, StopIteration):
        raise InvalidRequest(f"embedding {str(path)!r} is not in torch's zip format (torch >= 1.6); re-save it "
                             "as .safetensors") from None
    except (pickle.UnpicklingError, KeyError, ValueError, TypeError, EOFError) as e:
        raise InvalidRequest(f"embedding {str(path)!r} could not be read safely ({e})") from None
    if not isinstance(data, dict):
        raise InvalidRequest(f"embedding {str(path)!r} holds a {type(data).__name__}, not a dict of tensors")
    return data
