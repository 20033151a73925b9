"""Shared fixtures: the SD1-style and SD2-style random-weight models, built and exported once per session."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import build_model  # noqa: E402

FAMILIES = ("sd1", "sd2")
# SD1's U-Net runs through the CPU graph (fused attention, and Winograd on every eligible convolution however
# small: the test model's feature maps are 8x8 and 4x4), SD2's through the plain one.
SD1_CPU_GRAPH = {"cpu_graph_policy": "always", "winograd_rule": "all"}


@pytest.fixture
def correctly_rounded_reference(monkeypatch):
    """diffusers' schedulers with correctly rounded sqrt/log/exp (reference_math.py says why)."""
    from reference_math import patch_reference

    patch_reference(monkeypatch)


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {fam: build_model(root / fam, fam, seed=i) for i, fam in enumerate(FAMILIES)}


@pytest.fixture(scope="session")
def bundles(models, tmp_path_factory) -> dict[str, Path]:
    from sdrt.export import export_bundle

    root = tmp_path_factory.mktemp("bundles")
    for fam, src in models.items():
        export_bundle(src, root / fam, log=lambda *_: None, **SD1_CPU_GRAPH if fam == "sd1" else {})
    return {fam: root / fam for fam in FAMILIES}


@pytest.fixture(scope="session")
def pipes(bundles):
    import sdrt

    return {fam: sdrt.Pipeline.load(path) for fam, path in bundles.items()}


@pytest.fixture(scope="session")
def reference(models):
    """diffusers' StableDiffusionPipeline on the same weights."""
    from diffusers import StableDiffusionPipeline

    out = {}
    for fam, src in models.items():
        pipe = StableDiffusionPipeline.from_pretrained(src, safety_checker=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        out[fam] = pipe
    return out


def latents(batch: int = 1, seed: int = 0, size: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 4, size, size)).astype(np.float32)


def pixels(images) -> np.ndarray:
    """PIL images -> (B, H, W, 3) floats in [0, 1]."""
    return np.stack([np.asarray(im, dtype=np.float32) / 255 for im in images])


@pytest.fixture(scope="session")
def hn(tmp_path_factory):
    """Per family: the model folder, its bundle with one hypernetwork (SD1 baked while exporting, SD2 added to
    the exported bundle), the torch modules, and diffusers' pipeline on the same weights."""
    import sdrt
    from diffusers import StableDiffusionPipeline
    from hypernet_files import HYPERNET_FILES, TEXT_WIDTHS, write_a1111

    from sdrt.export import add_hypernetwork, export_bundle

    root = tmp_path_factory.mktemp("hypernet")
    out = {}
    for i, family in enumerate(("sd1", "sd2")):
        src = build_model(root / f"{family}-src", family, seed=10 + i, hidden=TEXT_WIDTHS[family])
        file = root / f"{family}_style.pt"
        modules = write_a1111(file, [32, TEXT_WIDTHS[family], 64], seed=i, **HYPERNET_FILES[family])
        bundle = root / f"{family}-bundle"
        if family == "sd1":
            export_bundle(src, bundle, log=lambda *_: None, hypernetworks=[file], allow_pickle=True)
        else:
            export_bundle(src, bundle, log=lambda *_: None)
            add_hypernetwork(bundle, file, allow_pickle=True, log=lambda *_: None)
        ref = StableDiffusionPipeline.from_pretrained(src, safety_checker=None, requires_safety_checker=False)
        ref.set_progress_bar_config(disable=True)
        out[family] = dict(src=src, bundle=bundle, file=file, modules=modules, ref=ref, name=file.stem,
                           pipe=sdrt.Pipeline.load(bundle))
    return out
