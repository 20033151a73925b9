"""Broken bundles, each with the exact message a user sees (after Triton's error corpus)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import sdrt
from sdrt.errors import BundleCorrupt, BundleNotFound, UnsupportedBundleVersion

REEXPORT = "re-export it with `sdrt export SRC --out BUNDLE`"


@pytest.fixture
def bundle(bundles, tmp_path):
    target = tmp_path / "bundle"
    shutil.copytree(bundles["sd1"], target)
    return target


def _edit_manifest(bundle, **changes):
    path = bundle / "sdrt.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_missing_folder(tmp_path):
    with pytest.raises(BundleNotFound) as e:
        sdrt.Pipeline.load(tmp_path / "nope")
    assert str(e.value) == (f"bundle '{tmp_path / 'nope'}' does not exist or is not a folder; "
                            "export one with `sdrt export SRC --out BUNDLE`")


def test_folder_without_manifest(tmp_path):
    with pytest.raises(BundleNotFound) as e:
        sdrt.Pipeline.load(tmp_path)
    assert str(e.value) == (f"'{tmp_path}' is not an sdrt bundle: it has no sdrt.json (and no optimum layout "
                            f"with unet/model.onnx); {REEXPORT}")


def test_missing_file(bundle):
    (bundle / "vae_decoder" / "model.onnx").unlink()
    with pytest.raises(BundleCorrupt) as e:
        sdrt.Pipeline.load(bundle)
    assert str(e.value) == f"bundle file '{bundle / 'vae_decoder' / 'model.onnx'}' is missing; {REEXPORT}"


def test_flipped_byte_in_a_graph(bundle):
    path = bundle / "unet" / "model.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(BundleCorrupt) as e:
        sdrt.Pipeline.load(bundle)
    assert str(e.value) == (f"bundle file '{path}' does not match its sha256 in sdrt.json (corrupt or modified); "
                            f"{REEXPORT}")


def test_edited_config_is_caught_too(bundle):
    path = bundle / "scheduler" / "scheduler_config.json"
    path.write_text(path.read_text().replace("epsilon", "v_prediction"))
    with pytest.raises(BundleCorrupt, match="scheduler_config.json' does not match its sha256"):
        sdrt.Pipeline.load(bundle)


def test_manifest_that_is_not_json(bundle):
    (bundle / "sdrt.json").write_text("{ not json")
    with pytest.raises(BundleCorrupt, match=r"sdrt.json' is unreadable or not valid JSON \(Expecting"):
        sdrt.Pipeline.load(bundle)


def test_manifest_of_another_format(bundle):
    (bundle / "sdrt.json").write_text(json.dumps({"hello": "world"}))
    with pytest.raises(BundleCorrupt, match='is not an sdrt manifest \\(expected "format": "sdrt-bundle"\\)'):
        sdrt.Pipeline.load(bundle)


def test_unknown_format_version(bundle):
    _edit_manifest(bundle, format_version=99)
    with pytest.raises(UnsupportedBundleVersion) as e:
        sdrt.Pipeline.load(bundle)
    assert str(e.value) == (f"'{bundle / 'sdrt.json'}' has format version 99, this sdrt reads versions 1, 2; "
                            f"{REEXPORT} with this sdrt, or install the sdrt that wrote it")


def test_manifest_missing_a_field(bundle):
    data = json.loads((bundle / "sdrt.json").read_text())
    del data["latent_channels"]
    (bundle / "sdrt.json").write_text(json.dumps(data))
    with pytest.raises(BundleCorrupt, match="is missing or has a malformed field"):
        sdrt.Pipeline.load(bundle)


def test_manifest_without_a_unet(bundle):
    data = json.loads((bundle / "sdrt.json").read_text())
    del data["graphs"]["unet"]
    (bundle / "sdrt.json").write_text(json.dumps(data))
    with pytest.raises(BundleCorrupt, match="lists no graph for unet"):
        sdrt.Pipeline.load(bundle)


@pytest.mark.parametrize("escape", ["../outside.onnx", "/etc/passwd", "unet/../../x"])
def test_a_manifest_pointing_outside_the_bundle_is_refused(bundle, escape):
    data = json.loads((bundle / "sdrt.json").read_text())
    data["graphs"]["unet"]["path"] = escape
    (bundle / "sdrt.json").write_text(json.dumps(data))
    with pytest.raises(BundleCorrupt) as e:
        sdrt.Pipeline.load(bundle)
    assert str(e.value) == (f"'{bundle / 'sdrt.json'}' names the file {escape!r}, outside the bundle; refusing it. "
                            f"{REEXPORT}")


def _replace_and_rehash(bundle, rel: str, content: bytes) -> None:
    """Overwrite a bundle file and update its sha256 in sdrt.json, so only the later checks can catch it."""
    from sdrt.runtime.fsutil import sha256_file

    (bundle / rel).write_bytes(content)
    data = json.loads((bundle / "sdrt.json").read_text())
    data["files"][rel] = sha256_file(bundle / rel)
    (bundle / "sdrt.json").write_text(json.dumps(data))


@pytest.mark.parametrize("rel", ["unet/model.cpu.onnx", "unet/model.onnx"])
def test_graph_swapped_for_another_with_rehashed_manifest(bundle, rel):
    """A manifest that promises other I/O than the graph has (hashes updated to match) is refused, whichever
    U-Net graph the CPU backend opens (the fused-attention one, or the plain one when there is none)."""
    if rel == "unet/model.onnx":
        data = json.loads((bundle / "sdrt.json").read_text())
        data["cpu_graphs"] = {}
        (bundle / "sdrt.json").write_text(json.dumps(data))
    _replace_and_rehash(bundle, rel, (bundle / "vae_decoder" / "model.onnx").read_bytes())
    with pytest.raises(BundleCorrupt, match="unet graph does not match sdrt.json: tensor 'sample'"):
        sdrt.Pipeline.load(bundle)


def test_unreadable_graph_with_matching_hash(bundle):
    _replace_and_rehash(bundle, "vae_decoder/model.cpu.onnx", b"not a protobuf")
    with pytest.raises(BundleCorrupt, match="vae_decoder graph .* could not be loaded by ONNX Runtime"):
        sdrt.Pipeline.load(bundle)


def test_present_but_unreadable_manifest_is_refused_even_in_an_optimum_layout(bundle):
    (bundle / "sdrt.json").write_bytes(b"\xff\xfe garbage")
    with pytest.raises(BundleCorrupt, match="sdrt.json' is unreadable or not valid JSON"):
        sdrt.Pipeline.load(bundle)


def test_a_real_optimum_cli_export_runs_and_matches_diffusers(tmp_path):
    """tests/fixtures/optimum_tiny was written by `optimum-cli export onnx` (optimum-onnx 0.1.0, see
    make_optimum_fixture.py); the expected images are diffusers' on the same weights and latents."""
    from pathlib import Path

    import sdrt.export

    fixtures = Path(__file__).parent / "fixtures"
    folder = tmp_path / "optimum"
    shutil.copytree(fixtures / "optimum_tiny", folder)
    for f in ("vocab.json", "merges.txt"):  # left out of the fixture: the same bytes sdrt ships
        shutil.copy(Path(sdrt.export.__file__).parent / "clip_tokenizer" / f, folder / "tokenizer" / f)
    expected = np.load(fixtures / "optimum_tiny_expected.npz")
    settings = json.loads((fixtures / "optimum_tiny_versions.json").read_text())
    with pytest.warns(UserWarning, match="has no sdrt.json \\(an optimum export\\?\\).*nothing was hashed"):
        pipe = sdrt.Pipeline.load(folder)
    assert pipe.manifest.hashed is False
    assert pipe.engines["unet"].inputs["timestep"].shape == ()  # optimum's U-Net takes one scalar timestep
    images = pipe.txt2img(settings["prompt"], negative_prompt=settings["negative_prompt"], steps=settings["steps"],
                          guidance=settings["guidance"], sampler=settings["sampler"], latents=expected["latents"],
                          batch=2)
    got = np.stack([np.asarray(im) for im in images]).astype(np.int16)
    assert np.abs(got - expected["images"]).max() <= 2
    assert got.std() > 20  # not a flat image
