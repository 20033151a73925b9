"""The interface every engine implements: named numpy arrays in, named numpy arrays out.

An engine reads each input's dtype and rank from the graph it opened, checks what it is given against them,
and casts between dtypes of the same kind (an optimum graph may take int32 ids or an int64 timestep where
sdrt's take int64 and float32), so graphs exported by other tools run too.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from ...errors import EngineError
from ..manifest import TensorSpec


class Engine(ABC):
    name: str
    inputs: dict[str, TensorSpec]
    outputs: dict[str, TensorSpec]

    @abstractmethod
    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ...

    def __call__(self, **feeds: np.ndarray) -> dict[str, np.ndarray]:
        return self._run(self.prepare(feeds))

    def prepare(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Check names, ranks, static dims and dtype kinds; cast to the graph's dtype."""
        unknown = set(feeds) - set(self.inputs)
        missing = set(self.inputs) - set(feeds)
        if unknown or missing:
            raise EngineError(f"{self.name}: inputs {sorted(feeds)} do not match the graph's {sorted(self.inputs)}")
        out = {}
        for key, value in feeds.items():
            spec, value = self.inputs[key], np.asarray(feeds[key])
            if value.ndim != len(spec.shape):
                raise EngineError(f"{self.name}: input {key!r} has shape {value.shape}, "
                                  f"the graph expects rank {len(spec.shape)} {spec.shape}")
            for got, want in zip(value.shape, spec.shape):
                if isinstance(want, int) and want != got:
                    raise EngineError(f"{self.name}: input {key!r} has shape {value.shape}, the graph expects {spec.shape}")
            want = np.dtype(spec.dtype)
            if value.dtype != want:
                if value.dtype.kind != want.kind and not (value.dtype.kind in "iu" and want.kind in "iu"):
                    raise EngineError(f"{self.name}: input {key!r} is {value.dtype}, the graph expects {want}")
                value = value.astype(want)
            out[key] = value if value.flags.c_contiguous else value.copy(order="C")  # keeps 0-d arrays 0-d
        return out
