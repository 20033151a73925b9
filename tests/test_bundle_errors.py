"""Broken bundles, each with the exact message a user sees (after Triton's error corpus)."""
from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest
from conftest import latents, pixels

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
    assert str(e.value) == (f"'{bundle / 'sdrt.json'}' has format version 99, this sdrt reads version 1; "
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


def test_graph_swapped_for_another_with_rehashed_manifest(bundle):
    """A manifest that promises other I/O than the graph has (hashes updated to match) is refused."""
    from sdrt.runtime.fsutil import sha256_file

    shutil.copy(bundle / "vae_decoder" / "model.onnx", bundle / "unet" / "model.onnx")
    data = json.loads((bundle / "sdrt.json").read_text())
    data["files"]["unet/model.onnx"] = sha256_file(bundle / "unet" / "model.onnx")
    (bundle / "sdrt.json").write_text(json.dumps(data))
    with pytest.raises(BundleCorrupt, match="unet graph does not match sdrt.json: tensor 'sample'"):
        sdrt.Pipeline.load(bundle)


def test_unreadable_graph_with_matching_hash(bundle):
    from sdrt.runtime.fsutil import sha256_file

    (bundle / "vae_decoder" / "model.onnx").write_bytes(b"not a protobuf")
    data = json.loads((bundle / "sdrt.json").read_text())
    data["files"]["vae_decoder/model.onnx"] = sha256_file(bundle / "vae_decoder" / "model.onnx")
    (bundle / "sdrt.json").write_text(json.dumps(data))
    with pytest.raises(BundleCorrupt, match="vae_decoder graph .* could not be loaded by ONNX Runtime"):
        sdrt.Pipeline.load(bundle)


def _optimum_style(models, bundle):
    """What `optimum-cli export onnx` writes: no sdrt.json, the published tokenizer files (no tokenizer.json),
    and a U-Net that takes one scalar timestep (optimum's UNetOnnxConfig: "timestep": {})."""
    import torch

    from sdrt.export.source import load_source
    from sdrt.export.trace import _wrappers

    (bundle / "sdrt.json").unlink()
    (bundle / "tokenizer" / "tokenizer.json").unlink()
    source = load_source(models["sd1"])
    unet = _wrappers()[1](source.unet)
    x, e = torch.randn(2, 4, 5, 7), torch.randn(2, 77, 32)
    torch.onnx.export(unet, (x, torch.tensor(500.0), e), str(bundle / "unet" / "model.onnx"),
                      input_names=["sample", "timestep", "encoder_hidden_states"], output_names=["out_sample"],
                      dynamic_axes={"sample": {0: "batch_size", 2: "height", 3: "width"},
                                    "encoder_hidden_states": {0: "batch_size", 1: "sequence_length"},
                                    "out_sample": {0: "batch_size", 2: "height", 3: "width"}},
                      opset_version=17, dynamo=False)


def test_optimum_folder_runs_with_a_derived_manifest_and_a_warning(models, bundles, bundle):
    _optimum_style(models, bundle)
    with pytest.warns(UserWarning, match="has no sdrt.json \\(an optimum export\\?\\).*nothing was hashed"):
        pipe = sdrt.Pipeline.load(bundle)
    assert pipe.manifest.hashed is False and pipe.engines["unet"].inputs["timestep"].shape == ()
    lat = latents(1, seed=9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = pixels(pipe.txt2img("a red circle", steps=5, latents=lat))
    b = pixels(sdrt.Pipeline.load(bundles["sd1"]).txt2img("a red circle", steps=5, latents=lat))
    assert np.abs(a - b).max() <= 1 / 255


def test_present_but_unreadable_manifest_is_refused_even_in_an_optimum_layout(bundle):
    (bundle / "sdrt.json").write_bytes(b"\xff\xfe garbage")
    with pytest.raises(BundleCorrupt, match="sdrt.json' is unreadable or not valid JSON"):
        sdrt.Pipeline.load(bundle)
