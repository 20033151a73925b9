"""The exporter's `ExportFamily` interface, the `Traced` component it hands the exporter, and the registry."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...errors import NotAModelFolder


@dataclass
class Traced:
    """One component as the exporter traces it."""

    module: object  # torch.nn.Module taking the inputs in order; `.m` is the diffusers/transformers model inside
    inputs: tuple  # example inputs of the trace (torch tensors)
    input_names: list[str]
    output_names: list[str]
    dynamic_axes: dict[str, dict[int, str]]


class ExportFamily:
    """A model family, the exporter's side (its runtime side: sdrt.runtime.families, by the same `name`).
    Subclass it, override what differs, and `register()` an instance."""

    name: str  # the manifest's "family"; the runtime family of that name opens the bundle

    def claims(self, src: Path) -> bool:
        """Whether the model at `src` (a folder or a file, not yet loaded) is of this family."""
        raise NotImplementedError

    def load(self, src: Path, allow_pickle: bool, variant: str | None):
        """The model's torch modules and configs (an export.source.Source). variant: the CLI's --family, for
        single files whose weights do not tell the variant (SD: sd1, sd2, sd2-v)."""
        raise NotImplementedError

    def components(self, source) -> dict[str, Traced]:
        """Every component to export, in export order."""
        raise NotImplementedError

    def check_inputs(self, source, component: str, height: int, width: int, ids: np.ndarray) -> dict[str, np.ndarray]:
        """Fixed inputs the exported graph is checked on against torch, at shapes other than the trace's."""
        raise NotImplementedError

    def expected_outputs(self, source, component: str, traced: Traced, feeds: dict[str, np.ndarray],
                         ids: np.ndarray) -> list[np.ndarray]:
        """What torch gives on `feeds`: the reference the graph must match."""
        raise NotImplementedError

    def manifest_fields(self, source, tokenizer, pad_id: int) -> dict:
        """The manifest's model fields (runtime.manifest.Manifest's latent_channels ... token_embeddings) from
        the source's configs; the exporter adds the graphs, files, hashes and versions."""
        raise NotImplementedError

    def write_files(self, source, folder: Path, tokenizer) -> None:
        """Everything of the bundle but its graphs and manifest (configs, tokenizer files, lookup tables)."""
        raise NotImplementedError

    def residual_layout(self, source) -> list[dict] | None:
        """The ControlNet residuals the U-Net takes, {"name", "channels", "level"} down then mid, or None when the
        family has no ControlNet U-Net (export/controlnet_unet.py)."""
        return None

    def settings(self, source) -> dict:
        """What the manifest records for this family alone (`family_settings`)."""
        return {}


_FAMILIES: list[ExportFamily] = []


def register(family: ExportFamily) -> ExportFamily:
    """Add `family`; it is asked before those registered earlier (the last resort, SD, is registered first)."""
    _FAMILIES.insert(0, family)
    return family


def unregister(family: ExportFamily) -> None:
    _FAMILIES.remove(family)


def family_for(src: Path) -> ExportFamily:
    for family in _FAMILIES:
        if family.claims(src):
            return family
    raise NotAModelFolder(f"{str(src)!r} is not a model of any family this sdrt exports")  # SD claims all
