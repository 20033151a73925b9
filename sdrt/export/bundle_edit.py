"""What the commands that edit an exported bundle in place share (`sdrt hypernetwork add/remove`,
`sdrt controlnet prepare`): the U-Net's check inputs without its torch model, the flock on the bundle that keeps
two edits from interleaving their manifest writes, and the atomic manifest write itself."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import InvalidRequest
from ..runtime import names
from ..runtime.fsutil import atomic_write_bytes, exclusive_lock
from ..runtime.manifest import Manifest


def check_feeds(manifest: Manifest, what: str) -> dict[str, np.ndarray]:
    """The U-Net's check inputs for a bundle without its torch model, as the exporter draws them. what: the edit,
    for the refusal ("hypernetworks can be added")."""
    spec = manifest.graphs[names.UNET]
    if {t.name for t in spec.inputs} != {names.SAMPLE, names.TIMESTEP, names.ENCODER_HIDDEN_STATES}:
        raise InvalidRequest(f"this bundle's U-Net takes {[t.name for t in spec.inputs]}; {what} to SD 1.x/2.x "
                             "bundles (sample, timestep, encoder_hidden_states)")
    rng = np.random.default_rng(1234)
    h, w = manifest.default_height // manifest.vae_scale_factor, manifest.default_width // manifest.vae_scale_factor
    return {names.SAMPLE: rng.standard_normal((1, manifest.unet_in_channels, h, w), dtype=np.float32),
            names.TIMESTEP: np.array([321.0], dtype=np.float32),
            names.ENCODER_HIDDEN_STATES: rng.standard_normal((1, 2 * manifest.tokenizer_max_length,
                                                              manifest.text_hidden_size), dtype=np.float32)}


def bundle_lock(bundle: Path):
    return exclusive_lock(bundle / ".sdrt.lock")


def write_manifest(bundle: Path, manifest: Manifest, errors: dict, dropped: str | None = None) -> None:
    """sdrt.json from `manifest`, keeping what it does not model (verification) from the file as it is, with the
    new check errors added and those of component `dropped` removed. A field the manifest leaves out when empty
    (hypernetworks, residuals) goes when it has become empty."""
    raw = json.loads((bundle / names.MANIFEST_FILE).read_text(encoding="utf-8"))
    fresh = manifest.to_json()
    modelled = set(Manifest.__dataclass_fields__) | {"format"}
    data = {k: v for k, v in raw.items() if k in fresh or k not in modelled} | fresh
    checks = data.setdefault("verification", {}).setdefault("errors", {})
    for key in [k for k in checks if dropped and k.startswith(f"{dropped}: ")]:
        del checks[key]
    checks.update(errors)
    atomic_write_bytes(bundle / names.MANIFEST_FILE, (json.dumps(data, indent=2) + "\n").encode())
