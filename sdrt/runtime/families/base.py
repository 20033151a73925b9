"""The `Family` interface and the registry the manifest's "family" name is looked up in."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ...errors import UnsupportedBundleVersion

if TYPE_CHECKING:  # the manifest imports this package; the pipeline is only passed in
    from ..manifest import Manifest

_FAMILIES: dict[str, "Family"] = {}


class Family:
    """One model family. Subclass it, override what differs, and `register()` an instance."""

    name: str
    required_components: tuple[str, ...]  # graphs every bundle of the family has
    text_components: tuple[str, ...]  # graphs run once per request on the prompts (TensorRT: one engine each)

    def open_text(self, bundle: Path, manifest: "Manifest", engines: dict) -> object:
        """The text side a pipeline keeps for its requests (`pipe.text`: tokenizers, lookup tables, the text
        encoder engines among `engines`), which `conditioning` uses."""
        raise NotImplementedError

    def conditioning(self, pipe, job) -> dict[str, np.ndarray]:
        """The U-Net's inputs besides sample and timestep for one request: rows [negative (B); positive (B)]
        with classifier-free guidance (job.guidance > 1), else the positive prompt's B rows."""
        raise NotImplementedError

    def input_shapes(self, manifest: "Manifest", component: str, rows: int, height: int, width: int,
                     tokens: int) -> dict[str, tuple[int, ...]]:
        """Every input name a graph of `component` may take -> its static shape for an engine of `rows` rows
        at `height` x `width` pixels with `tokens` text tokens (TensorRT builds one engine per such shape)."""
        raise NotImplementedError

    def native_size(self, manifest: "Manifest") -> tuple[int, int]:
        """(height, width) the family's models are trained at, for a manifest that records no default size."""
        raise NotImplementedError

    def default_inputs(self, component: str) -> dict[str, tuple]:
        """Input name -> shape (strings for dynamic dims) of a graph whose manifest lists none (optimum's)."""
        raise NotImplementedError


def register(family: Family) -> Family:
    """Make `family` the one bundles whose manifest names `family.name` open with (a later one replaces it)."""
    _FAMILIES[family.name] = family
    return family


def unregister(name: str) -> None:
    _FAMILIES.pop(name, None)


def registered() -> tuple[str, ...]:
    return tuple(_FAMILIES)


def family_of(name: str) -> Family:
    """The family a manifest names; a typed error for one this sdrt does not know."""
    family = _FAMILIES.get(name)
    if family is None:
        raise UnsupportedBundleVersion(f"the bundle is of model family {name!r}, which this sdrt does not run "
                                       f"(it runs {', '.join(sorted(_FAMILIES))}); install an sdrt that does, "
                                       "or export the bundle again with this one")
    return family
