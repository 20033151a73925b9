"""Single-file checkpoints (model.safetensors in the original CompVis/LDM layout): the bundle exported from the
file gives the images of the bundle exported from the same model's diffusers folder; the family is read from
the weights; files that are not SD 1.x/2.x checkpoints are refused with what they are."""
from __future__ import annotations

import hashlib
import json
import re

import numpy as np
import pytest

from conftest import latents, pixels
from single_file_fixture import build_ldm_model, to_ldm, write_single_file
from sdrt.errors import InvalidRequest, NotAModelFolder, PickleRefused, SourceError
from sdrt.export import export_bundle
from sdrt.export.single_file import load_single_file
from sdrt.runtime.manifest import load_manifest

QUIET = {"log": lambda *_: None}
SIZE = {"height": 64, "width": 64}  # the tiny models' size (the published configs' 512/768 would be slow)


@pytest.fixture(scope="module")
def ldm(tmp_path_factory) -> dict:
    """Per family: the reference diffusers folder and the same weights as one .safetensors file."""
    root = tmp_path_factory.mktemp("single_file")
    out = {}
    for i, fam in enumerate(("sd1", "sd2")):
        folder = build_ldm_model(root / fam, fam, seed=20 + i)
        out[fam] = (folder, write_single_file(folder, root / f"{fam}.safetensors", fam))
    return out


def _image(bundle, prompt="a red circle on a blue background"):
    import sdrt

    return pixels(sdrt.Pipeline.load(bundle).txt2img(prompt, steps=4, latents=latents(1, seed=7)))


def _export_via_cli(capsys, *argv) -> str:
    from sdrt.cli import main

    with pytest.raises(SystemExit) as e:
        main(["export", *map(str, argv)])
    out, err = capsys.readouterr()
    assert e.value.code == 0, err
    return err


@pytest.mark.parametrize("fam", ["sd1", "sd2"])
def test_the_single_file_bundle_gives_the_folder_bundles_images(ldm, fam, tmp_path, capsys):
    folder, file = ldm[fam]
    export_bundle(folder, tmp_path / "from_folder", **SIZE, **QUIET)
    if fam == "sd1":  # detected from the weights
        export_bundle(file, tmp_path / "from_file", **SIZE, **QUIET)
    else:  # through the CLI, v-prediction given with --family (detection: the next test)
        err = _export_via_cli(capsys, file, "--out", tmp_path / "from_file", "--family", "sd2-v",
                              "--height", 64, "--width", 64)
        assert "warning" not in err
    ref, got = (load_manifest(tmp_path / b) for b in ("from_folder", "from_file"))
    assert got.prediction_type == ref.prediction_type == ("epsilon" if fam == "sd1" else "v_prediction")
    assert got.source_hash == hashlib.sha256(file.read_bytes()).hexdigest()  # the file's: A1111's model hash
    for comp in ("unet", "vae_decoder", "text_encoder"):  # sizes from the weights, not the published configs
        a = json.loads((tmp_path / "from_folder" / comp / "config.json").read_text())
        b = json.loads((tmp_path / "from_file" / comp / "config.json").read_text())
        for key in ("block_out_channels", "layers_per_block", "attention_head_dim", "cross_attention_dim",
                    "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
            assert a.get(key) == b.get(key), (comp, key)
    a, b = _image(tmp_path / "from_folder"), _image(tmp_path / "from_file")
    assert a.std() > 0.05  # a picture with contrast, not a flat one that would hide a wrong weight
    assert np.abs(a - b).max() <= 1 / 255


def test_the_family_comes_from_the_weights_and_the_metadata(ldm, tmp_path):
    folder, sd2 = ldm["sd2"]
    with pytest.warns(UserWarning, match="assuming v-prediction at 768 as diffusers does.*--family sd2$"):
        s = load_single_file(sd2)
    s.close()
    assert s.scheduler_config["prediction_type"] == "v_prediction" and s.unet.config.sample_size == 96
    assert s.text_encoder.config.num_hidden_layers == 2  # OpenCLIP's 3 layers less the one SD 2.x skips
    assert not s.path.exists()  # close() removed the temporary config folder
    s = load_single_file(sd2, family="sd2")  # 2.x base: epsilon, 512, no warning
    s.close()
    assert s.scheduler_config["prediction_type"] == "epsilon" and s.unet.config.sample_size == 64
    tagged = write_single_file(folder, tmp_path / "tagged.safetensors", "sd2",
                               metadata={"modelspec.architecture": "stable-diffusion-v2-512"})
    s = load_single_file(tagged)  # ModelSpec metadata decides, without a warning
    s.close()
    assert s.scheduler_config["prediction_type"] == "epsilon"
    with pytest.raises(InvalidRequest, match=re.escape(
            f"--family sd1 does not fit {str(sd2)!r}: its weights are SD 2.x (OpenCLIP text encoder); use --family "
            "sd2 or sd2-v, or leave it out")):
        load_single_file(sd2, family="sd1")
    with pytest.raises(InvalidRequest, match=re.escape("unknown --family 'sdxl'; expected one of sd1, sd2, sd2-v")):
        export_bundle(sd2, tmp_path / "b", family="sdxl", **QUIET)
    with pytest.raises(InvalidRequest, match="--family is for single-file checkpoints; .* is a folder"):
        export_bundle(folder, tmp_path / "b", family="sd2", **QUIET)


def test_a_ckpt_needs_allow_pickle_and_loads_with_it(ldm, tmp_path):
    import torch

    folder, _ = ldm["sd2"]
    ckpt = write_single_file(folder, tmp_path / "sd2.ckpt", "sd2", global_step=875000)
    with pytest.raises(PickleRefused, match=re.escape(
            f"{str(ckpt)!r} is a pickle checkpoint (.ckpt), which can run code when loaded; use its .safetensors "
            "version, or pass --allow-pickle to load it in torch's weights_only mode")):
        export_bundle(ckpt, tmp_path / "b", **QUIET)
    assert not (tmp_path / "b").exists()
    s = load_single_file(ckpt, allow_pickle=True)  # global step 875000: SD 2.0-base, epsilon (diffusers' rule)
    s.close()
    assert s.scheduler_config["prediction_type"] == "epsilon"
    want = to_ldm(folder, "sd2")["model.diffusion_model.out.2.weight"]
    assert torch.equal(s.unet.conv_out.weight, want)


def test_a_malicious_ckpt_does_not_run_even_with_allow_pickle(tmp_path):
    import torch

    from test_export import _Payload

    marker = tmp_path / "pwned"
    torch.save({"state_dict": {"model.diffusion_model.x": _Payload(str(marker))}}, tmp_path / "evil.ckpt")
    with pytest.raises(SourceError, match="could not be read in torch's weights_only mode"):
        load_single_file(tmp_path / "evil.ckpt", allow_pickle=True)
    assert not marker.exists()


def test_an_fp16_file_with_old_clip_names_loads_as_float32(ldm, tmp_path):
    """Half-precision files are common; some SD 1.x files name CLIP's weights without `text_model.` (an older
    transformers'), which AUTOMATIC1111 reads too."""
    import torch
    from safetensors.torch import load_file, save_file

    folder, _ = ldm["sd1"]
    half = write_single_file(folder, tmp_path / "half.safetensors", "sd1", dtype=torch.float16)
    old = "cond_stage_model.transformer.text_model."
    save_file({k.replace(old, "cond_stage_model.transformer."): v for k, v in load_file(half).items()}, str(half))
    s = load_single_file(half)
    s.close()
    want = to_ldm(folder, "sd1")
    assert s.unet.conv_in.weight.dtype == torch.float32
    assert torch.equal(s.unet.conv_in.weight, want["model.diffusion_model.input_blocks.0.0.weight"].half().float())
    assert torch.equal(s.text_encoder.get_input_embeddings().weight,
                       want[old + "embeddings.token_embedding.weight"].half().float())


def _save(path, tensors: dict, metadata=None):
    from safetensors.numpy import save_file

    save_file({k: np.zeros(shape, np.float32) for k, shape in tensors.items()}, str(path), metadata=metadata)
    return path


def test_files_that_are_not_sd_checkpoints_are_refused_with_what_they_are(ldm, tmp_path):
    xl = _save(tmp_path / "xl.safetensors", {
        "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
        "model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
        "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight": (77, 768),
        "conditioner.embedders.1.model.positional_embedding": (77, 1280)})
    lora = _save(tmp_path / "style.safetensors", {
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 320),
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": (320, 4),
        "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": ()}, metadata={"ss_network_module": "networks.lora"})
    peft = _save(tmp_path / "peft.safetensors", {"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": (4, 320)})
    other = _save(tmp_path / "other.safetensors", {"classifier.weight": (10, 512), "classifier.bias": (10,)})
    vae = _save(tmp_path / "vae.safetensors", {"encoder.conv_in.weight": (128, 3, 3, 3),
                                               "decoder.conv_out.weight": (3, 128, 3, 3)})
    cases = [
        (xl, f"{str(xl)!r} is an SDXL checkpoint (it has conditioner.embedders.* text encoders); SDXL is not "
             "supported: sdrt exports Stable Diffusion 1.x and 2.x"),
        (lora, f"{str(lora)!r} is a LoRA (a low-rank adapter for a base model), not a full model: export the base "
               "model, and apply the LoRA when generating (--lora style.safetensors)"),
        (peft, f"{str(peft)!r} is a LoRA (a low-rank adapter for a base model), not a full model: export the base "
               "model, and apply the LoRA when generating (--lora peft.safetensors)"),
        (other, f"{str(other)!r} is not a Stable Diffusion 1.x/2.x checkpoint: it has no U-Net weights "
                "(model.diffusion_model.input_blocks.*). sdrt reads single files in the original layout "
                "(model.diffusion_model.*, first_stage_model.*, cond_stage_model.*) and diffusers model folders"),
        (vae, f"{str(vae)!r} is not a Stable Diffusion 1.x/2.x checkpoint: it has no U-Net weights "
              "(model.diffusion_model.input_blocks.*) (it holds a VAE only). sdrt reads single files in the original "
              "layout (model.diffusion_model.*, first_stage_model.*, cond_stage_model.*) and diffusers model folders"),
    ]
    for path, message in cases:
        with pytest.raises(NotAModelFolder, match=f"^{re.escape(message)}$"):
            export_bundle(path, tmp_path / "b", **QUIET)
    assert not (tmp_path / "b").exists()

    from safetensors.torch import load_file, save_file

    _, sd1 = ldm["sd1"]
    unet_only = tmp_path / "unet_only.safetensors"
    save_file({k: v for k, v in load_file(sd1).items() if k.startswith("model.")}, str(unet_only))
    with pytest.raises(NotAModelFolder, match=re.escape(
            "lacks the VAE (first_stage_model.*) and the text encoder (cond_stage_model.transformer.* or "
            "cond_stage_model.model.*) of a full Stable Diffusion checkpoint (some files hold the U-Net only); use a "
            "complete checkpoint")):
        export_bundle(unet_only, tmp_path / "b", **QUIET)


def test_unreadable_files_fail_with_one_message(ldm, tmp_path):
    _, sd1 = ldm["sd1"]
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(sd1.read_bytes()[:5000])  # an interrupted download
    with pytest.raises(SourceError, match=f"^{re.escape(repr(str(cut)))} is not a readable safetensors file \\(.+\\); "
                                          "it may be truncated or not a checkpoint: download it again$"):
        export_bundle(cut, tmp_path / "b", **QUIET)
    text = tmp_path / "notes.txt"
    text.write_text("not weights")
    with pytest.raises(SourceError, match="is not a readable safetensors file .* single files must be .safetensors "
                                          "\\(or .ckpt/.pt/.pth/.bin with --allow-pickle\\)$"):
        export_bundle(text, tmp_path / "b", **QUIET)
    with pytest.raises(NotAModelFolder, match="does not exist; give a single-file checkpoint"):
        export_bundle(tmp_path / "missing.safetensors", tmp_path / "b", **QUIET)
    from safetensors.torch import load_file, save_file

    weights = load_file(sd1)
    holed = tmp_path / "holed.safetensors"  # diffusers' loader would leave the hole empty: refused instead
    save_file({k: v for k, v in weights.items() if k != "model.diffusion_model.out.2.bias"}, str(holed))
    with pytest.raises(SourceError, match=re.escape(
            f"{str(holed)!r}: the unet weights do not fit the layout read from the file: 1 missing (e.g. "
            "conv_out.bias); the file is damaged or a variant sdrt does not support")):
        export_bundle(holed, tmp_path / "b", **QUIET)
    save_file({k: v for k, v in weights.items() if k != "model.diffusion_model.out.2.weight"}, str(holed))
    with pytest.raises(SourceError, match="the weight 'model.diffusion_model.out.2.weight', which its layout needs, "
                                          "is missing"):
        export_bundle(holed, tmp_path / "b", **QUIET)
    nan = tmp_path / "nan.safetensors"
    weights["first_stage_model.decoder.conv_out.weight"].view(-1)[0] = float("nan")
    save_file(weights, str(nan))
    with pytest.raises(SourceError, match="vae weight 'decoder.conv_out.weight' contains NaN or Inf"):
        export_bundle(nan, tmp_path / "b", **QUIET)
