"""torch.save files read without torch: a restricted unpickler that rebuilds tensors as numpy arrays and
plain containers, and refuses every other class (the route by which a pickle runs code).

Callers read pickles only when the user allowed them (`--allow-pickle`): embeddings (.pt/.bin) and
hypernetworks (.pt).
"""
from __future__ import annotations

import collections
import pickle
import zipfile
from pathlib import Path

import numpy as np

from ..errors import InvalidRequest

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
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only tensors and plain values are read")

    def persistent_load(self, pid):
        _, storage_type, key, _location, _numel = pid  # ('storage', type, key, location, numel)
        raw = self.archive.read(f"{self.prefix}/data/{key}")
        if _STORAGES[storage_type] == "bfloat16":  # numpy has no bfloat16: widen to float32 by bits
            return (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32)
        return np.frombuffer(raw, _STORAGES[storage_type])


def read_torch_pickle(path: Path, what: str) -> dict:
    """The dict a torch.save file holds, tensors as numpy arrays; `what` names the file in errors."""
    try:
        with zipfile.ZipFile(path) as archive:
            pkl = next(n for n in archive.namelist() if n.endswith("/data.pkl"))
            with archive.open(pkl) as f:
                data = _TensorUnpickler(f, archive, pkl.rsplit("/", 1)[0]).load()
    except (zipfile.BadZipFile, StopIteration):
        fix = "as .safetensors" if what == "embedding" else "with torch.save in torch >= 1.6"
        raise InvalidRequest(f"{what} {str(path)!r} is not in torch's zip format (torch >= 1.6); re-save it "
                             f"{fix}") from None
    except (pickle.UnpicklingError, KeyError, ValueError, TypeError, EOFError) as e:
        raise InvalidRequest(f"{what} {str(path)!r} could not be read safely ({e})") from None
    if not isinstance(data, dict):
        raise InvalidRequest(f"{what} {str(path)!r} holds a {type(data).__name__}, not a dict of tensors")
    return data
