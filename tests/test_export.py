"""The exporter: bundle layout and manifest, checks against torch, atomic writes, and the refusals."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import SD1_CPU_GRAPH, latents, pixels

import sdrt
from sdrt.errors import ExportFailed, InvalidRequest, NotAModelFolder, OutputNotWritable, PickleRefused, SourceError
from sdrt.export import bundle as bundle_mod
from sdrt.export import export_bundle, trace, verify
from sdrt.runtime.fsutil import sha256_file

QUIET = {"log": lambda *_: None}


def test_bundle_has_optimums_layout_and_a_complete_manifest(bundles):
    b = bundles["sd1"]
    for comp in ("text_encoder", "unet", "vae_decoder", "vae_encoder"):
        assert (b / comp / "model.onnx").is_file() and (b / comp / "config.json").is_file()
    assert (b / "tokenizer" / "tokenizer.json").is_file() and (b / "scheduler" / "scheduler_config.json").is_file()
    assert (b / "model_index.json").is_file()
    m = json.loads((b / "sdrt.json").read_text())
    assert m["format"] == "sdrt-bundle" and m["format_version"] == 2
    on_disk = {p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file()} - {"sdrt.json"}
    assert set(m["files"]) == on_disk
    assert all(sha256_file(b / rel) == digest for rel, digest in m["files"].items())
    unet = {t["name"]: t for t in m["graphs"]["unet"]["inputs"]}
    assert unet["sample"]["shape"] == ["batch", 4, "height", "width"] and unet["sample"]["dynamic"] == [0, 2, 3]
    assert unet["timestep"]["dtype"] == "float32"
    assert m["graphs"]["text_encoder"]["inputs"][0] == {"name": "inputs_embeds", "dtype": "float32",
                                                        "shape": ["batch", 77, 32], "dynamic": [0]}
    hidden = {t["name"]: t for t in m["graphs"]["text_encoder"]["outputs"]}["hidden_states"]
    hidden_shape = hidden["shape"][:2] + hidden["shape"][3:]  # the token axis may carry a symbolic name
    assert hidden_shape == ["batch", 3, 32]  # the embeddings' output and each of the 2 layers'
    assert m["token_embeddings"] == "text_encoder/token_embeddings.npy" and m["token_embeddings"] in m["files"]
    assert np.load(b / m["token_embeddings"]).shape == (49408, 32)
    assert (m["latent_channels"], m["vae_scaling_factor"], m["prediction_type"]) == (4, 0.18215, "epsilon")
    assert (m["tokenizer_max_length"], m["tokenizer_pad_id"]) == (77, 49407)
    assert (m["default_height"], m["default_width"]) == (64, 64)  # the U-Net's sample_size x 8
    assert len(m["source_hash"]) == 64
    assert set(m["versions"]) >= {"sdrt", "torch", "diffusers", "transformers", "onnx"}
    assert max(m["verification"]["errors"].values()) < verify.RELATIVE_ERROR_LIMIT


def test_sd2_bundle_records_v_prediction_and_bang_padding(bundles):
    m = json.loads((bundles["sd2"] / "sdrt.json").read_text())
    assert (m["prediction_type"], m["tokenizer_pad_id"]) == ("v_prediction", 0)


def test_external_data_round_trips_and_gives_the_same_images(models, bundles, tmp_path):
    out = tmp_path / "ext"
    export_bundle(models["sd1"], out, external_threshold=0, **SD1_CPU_GRAPH, **QUIET)
    assert (out / "unet" / "model.onnx_data").is_file()
    assert (out / "unet" / "model.onnx_data").stat().st_mode & 0o044 == 0o044  # readable by others, as the rest
    assert "unet/model.onnx_data" in json.loads((out / "sdrt.json").read_text())["files"]
    lat = latents(1, seed=4)
    a = pixels(sdrt.Pipeline.load(out).txt2img("a cat", steps=4, latents=lat))
    b = pixels(sdrt.Pipeline.load(bundles["sd1"]).txt2img("a cat", steps=4, latents=lat))
    assert np.array_equal(a, b)


def test_height_and_width_set_the_bundle_default(models, tmp_path):
    m = export_bundle(models["sd2"], tmp_path / "b", height=48, width=80, **QUIET)
    assert (m.default_height, m.default_width) == (48, 80)
    assert sdrt.Pipeline.load(tmp_path / "b").txt2img("x", steps=1, seed=1)[0].size == (80, 48)
    with pytest.raises(InvalidRequest, match="--height must be a positive multiple of 8, got 50"):
        export_bundle(models["sd2"], tmp_path / "c", height=50, **QUIET)
    assert not (tmp_path / "c").exists()


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_a_failed_check_leaves_nothing_behind(models, tmp_path, monkeypatch):
    monkeypatch.setattr(verify, "RELATIVE_ERROR_LIMIT", 0.0)
    with pytest.raises(ExportFailed, match=r"text_encoder: ONNX Runtime differs from torch by relative error [0-9.e-]+ "):
        export_bundle(models["sd1"], tmp_path / "b", **QUIET)
    assert _leftovers(tmp_path) == []


def test_an_interrupted_export_leaves_nothing_behind(models, tmp_path, monkeypatch):
    real, calls = trace.export_onnx, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(trace, "export_onnx", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_bundle(models["sd1"], tmp_path / "b", **QUIET)
    assert _leftovers(tmp_path) == []


def test_a_full_disk_fails_cleanly(models, tmp_path, monkeypatch):
    import errno

    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(bundle_mod, "atomic_write_bytes", full)  # the manifest, the last write
    with pytest.raises(ExportFailed) as e:
        export_bundle(models["sd1"], tmp_path / "b", **QUIET)
    assert str(e.value) == (f"writing the bundle failed (No space left on device); nothing was written at "
                            f"'{tmp_path / 'b'}'. Check the free space and permissions of its folder")
    assert _leftovers(tmp_path) == []


def test_an_existing_bundle_is_replaced_only_with_force(models, bundles, tmp_path):
    target = tmp_path / "b"
    shutil.copytree(bundles["sd1"], target)
    with pytest.raises(OutputNotWritable, match="already exists; choose another --out or pass --force"):
        export_bundle(models["sd2"], target, **QUIET)
    export_bundle(models["sd2"], target, force=True, **QUIET)
    assert json.loads((target / "sdrt.json").read_text())["prediction_type"] == "v_prediction"
    assert _leftovers(tmp_path) == ["b"]


def test_a_bundle_written_meanwhile_by_another_export_is_not_clobbered(models, tmp_path, monkeypatch):
    target, real = tmp_path / "b", trace.export_onnx

    def racing(*args, **kwargs):  # another process finishes the same --out while this one traces
        if not target.exists():
            target.mkdir()
            (target / "sdrt.json").write_text("theirs")
        return real(*args, **kwargs)

    monkeypatch.setattr(trace, "export_onnx", racing)
    with pytest.raises(OutputNotWritable, match="appeared while exporting \\(another export\\?\\); it was left"):
        export_bundle(models["sd1"], target, **QUIET)
    assert (target / "sdrt.json").read_text() == "theirs" and _leftovers(tmp_path) == ["b"]


def _pickle_only_copy(models, tmp_path) -> Path:
    import torch
    from safetensors.torch import load_file

    src = tmp_path / "pickled"
    shutil.copytree(models["sd1"], src)
    for comp in ("text_encoder", "unet", "vae"):
        for f in (src / comp).glob("*.safetensors"):
            name = "pytorch_model.bin" if comp == "text_encoder" else "diffusion_pytorch_model.bin"
            torch.save(load_file(f), f.with_name(name))
            f.unlink()
    return src


def test_pickle_weights_are_refused_without_the_flag_and_loaded_with_it(models, tmp_path):
    src = _pickle_only_copy(models, tmp_path)
    with pytest.raises(PickleRefused, match="has only pickle weights .* pass --allow-pickle"):
        export_bundle(src, tmp_path / "b", **QUIET)
    assert not (tmp_path / "b").exists()
    export_bundle(src, tmp_path / "b", allow_pickle=True, **QUIET)
    assert (tmp_path / "b" / "sdrt.json").is_file()


class _Payload:
    """Unpickling this would create a file: weights_only loading must refuse before it runs."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_malicious_pickle_does_not_run_even_with_the_flag(models, tmp_path):
    import torch

    src = _pickle_only_copy(models, tmp_path)
    marker = tmp_path / "pwned"
    torch.save({"weight": _Payload(str(marker))}, src / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(SourceError, match="could not load unet"):
        export_bundle(src, tmp_path / "b", allow_pickle=True, **QUIET)
    assert not marker.exists()
    assert not (tmp_path / "b").exists()


def test_non_finite_weights_are_refused(models, tmp_path):
    from safetensors.torch import load_file, save_file

    src = tmp_path / "nan"
    shutil.copytree(models["sd1"], src)
    f = src / "vae" / "diffusion_pytorch_model.safetensors"
    weights = load_file(f)
    key = sorted(k for k in weights if k.endswith("weight"))[0]
    weights[key].view(-1)[0] = float("nan")
    save_file(weights, f)
    with pytest.raises(SourceError, match=f"vae weight '{key}' contains NaN or Inf"):
        export_bundle(src, tmp_path / "b", **QUIET)


def test_sources_that_are_not_sd_folders_are_refused(models, tmp_path):
    with pytest.raises(NotAModelFolder, match="is not a diffusers model folder \\(no model_index.json\\)"):
        export_bundle(tmp_path, tmp_path / "b", **QUIET)
    src = tmp_path / "xl"
    shutil.copytree(models["sd1"], src)
    index = json.loads((src / "model_index.json").read_text())
    (src / "model_index.json").write_text(json.dumps({**index, "text_encoder_2": ["transformers", "X"]}))
    with pytest.raises(NotAModelFolder, match="is an SDXL model"):
        export_bundle(src, tmp_path / "b", **QUIET)
    shutil.rmtree(src / "vae")
    (src / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(NotAModelFolder, match="lacks the component folder\\(s\\) vae"):
        export_bundle(src, tmp_path / "b", **QUIET)


def test_a_tokenizer_that_disagrees_with_transformers_fails_the_export(models, tmp_path, monkeypatch):
    """The check that guards the runtime tokenizer: feed it one whose vocabulary swaps two words."""
    from tokenizers import Tokenizer

    from sdrt.runtime.tokenizer import build_clip_tokenizer

    def swapped(folder):
        data = json.loads(build_clip_tokenizer(folder / "vocab.json", folder / "merges.txt").to_str())
        vocab = data["model"]["vocab"]
        vocab["hello</w>"], vocab["world</w>"] = vocab["world</w>"], vocab["hello</w>"]
        return Tokenizer.from_str(json.dumps(data))

    monkeypatch.setattr(bundle_mod, "TOKENIZER_CORPUS", ["hello world"])
    monkeypatch.setattr(bundle_mod, "load_tokenizer_files", swapped)
    with pytest.raises(ExportFailed, match="disagrees with transformers' CLIPTokenizer on 'hello world'"):
        export_bundle(models["sd1"], tmp_path / "b", **QUIET)
    assert _leftovers(tmp_path) == []
