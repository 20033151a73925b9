"""Tiny Stable Diffusion models written as ORIGINAL single-file checkpoints (CompVis/LDM key layout), built in code.

`build_ldm_model(root, family)`: tests/tiny_models.py's random model in diffusers' layout, made to follow the
hyperparameters of the original LDM code that a single file cannot record (its weights don't show them):
GroupNorm with 32 groups in the U-Net and the VAE, the U-Net's attention heads (SD 1.x: 8 per block; SD 2.x:
64 channels each) and the text encoder's (64 channels each). So the U-Net channels are (32, 64) for SD 1.x and
(64, 128) for SD 2.x, the text width 64 (one head), and the VAE 32 channels wide. The scheduler config is the
family's published one, as sdrt ships it. This is the reference folder.

`to_ldm(folder, family)`: the reverse of diffusers' single-file conversion, after diffusers'
scripts/convert_diffusers_to_original_stable_diffusion.py (SD 1.x), generalised to any number of levels and
layers per level; for SD 2.x the text encoder goes into OpenCLIP's layout (`cond_stage_model.model.*`, q/k/v
packed into `in_proj_weight`, `resblocks.N`), plus the last OpenCLIP layer that SD 2.x skips (random weights
here: a correct loader never uses them) and OpenCLIP's `text_projection` / `logit_scale`. Like real
checkpoints it also carries training leftovers (`alphas_cumprod`, `model_ema.decay`) that loaders must ignore.

`python tests/single_file_fixture.py OUT_DIR [sd1|sd2]` writes the folder and `OUT_DIR.safetensors`.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import build_model  # noqa: E402

import sdrt.export  # noqa: E402

SHIPPED = Path(sdrt.export.__file__).parent / "single_file_configs"
PUBLISHED_FAMILY = {"sd1": "sd1", "sd2": "sd2-v"}  # the tiny SD2 model predicts v, as SD 2.1 (768) does


def _patch_json(path: Path, **values) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **values}, indent=2))


def build_ldm_model(root: Path, family: str = "sd1", seed: int = 0) -> Path:
    import torch
    from diffusers import AutoencoderKL

    sd2 = family == "sd2"
    channels = (64, 128) if sd2 else (32, 64)
    root = build_model(Path(root), family, seed=seed, hidden=64, channels=channels)
    _patch_json(root / "unet" / "config.json", norm_num_groups=32,
                attention_head_dim=[c // 64 for c in channels] if sd2 else 8)
    _patch_json(root / "text_encoder" / "config.json", num_attention_heads=1)
    torch.manual_seed(seed + 100)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(32,) * 4, layers_per_block=1,
                        latent_channels=4, norm_num_groups=32, sample_size=64).eval()
    with torch.no_grad():  # as tiny_models._add_contrast does for its VAE
        vae.decoder.conv_out.weight.mul_(2.0)
        vae.decoder.conv_out.bias.copy_(torch.randn(vae.decoder.conv_out.bias.shape) * 0.2)
    shutil.rmtree(root / "vae")
    vae.save_pretrained(root / "vae", safe_serialization=True)
    published = SHIPPED / PUBLISHED_FAMILY[family]
    shutil.copy(published / "scheduler" / "scheduler_config.json", root / "scheduler" / "scheduler_config.json")
    scheduler = json.loads((published / "model_index.json").read_text())["scheduler"]
    _patch_json(root / "model_index.json", scheduler=scheduler)
    return root


# ------------------------------------------------------------------------------------------------------------
# diffusers -> LDM key names

_RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"), ("conv2", "out_layers.3"),
           ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection")]
_VAE_ATTENTION = [("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")]


def _rename(state: dict, prefixes: list[tuple[str, str, list]], out_prefix: str) -> dict:
    """Each key under the longest matching diffusers prefix gets the LDM prefix and inner renames."""
    prefixes = sorted(prefixes, key=lambda p: -len(p[0]))
    out = {}
    for key, value in state.items():
        for old, new, inner in prefixes:
            if key.startswith(old):
                rest = key[len(old):]
                for a, b in inner:
                    if rest.startswith(a + "."):
                        rest = b + rest[len(a):]
                out[out_prefix + new + rest] = value
                break
        else:
            raise KeyError(f"no LDM name for {key}")
    return out


def down_path_to_ldm(config: dict) -> tuple[list, int]:
    """The renames of the down path and mid block (the U-Net's, and a ControlNet's copy of them), and the number
    of input blocks."""
    n, layers = len(config["block_out_channels"]), config["layers_per_block"]
    down_attn = [t.startswith("CrossAttn") for t in config["down_block_types"]]
    p = [("time_embedding.linear_1.", "time_embed.0.", []), ("time_embedding.linear_2.", "time_embed.2.", []),
         ("conv_in.", "input_blocks.0.0.", []),
         ("mid_block.resnets.0.", "middle_block.0.", _RESNET), ("mid_block.attentions.0.", "middle_block.1.", []),
         ("mid_block.resnets.1.", "middle_block.2.", _RESNET)]
    idx = 1
    for i in range(n):
        for j in range(layers):
            p.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{idx}.0.", _RESNET))
            if down_attn[i]:
                p.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{idx}.1.", []))
            idx += 1
        if i < n - 1:
            p.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{idx}.0.op.", []))
            idx += 1
    return p, idx


def unet_to_ldm(state: dict, config: dict) -> dict:
    n, layers = len(config["block_out_channels"]), config["layers_per_block"]
    up_attn = [t.startswith("CrossAttn") for t in config["up_block_types"]]
    p, _ = down_path_to_ldm(config)
    p += [("conv_norm_out.", "out.0.", []), ("conv_out.", "out.2.", [])]
    idx = 0
    for i in range(n):
        for j in range(layers + 1):
            p.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{idx}.0.", _RESNET))
            if up_attn[i]:
                p.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{idx}.1.", []))
            if j == layers and i < n - 1:
                at = 2 if up_attn[i] else 1  # after the attention, if the block has one
                p.append((f"up_blocks.{i}.upsamplers.0.conv.", f"output_blocks.{idx}.{at}.conv.", []))
            idx += 1
    return _rename(state, p, "model.diffusion_model.")


def vae_to_ldm(state: dict, config: dict) -> dict:
    n, layers = len(config["block_out_channels"]), config["layers_per_block"]
    shortcut = [("conv_shortcut", "nin_shortcut")]
    p = [("quant_conv.", "quant_conv.", []), ("post_quant_conv.", "post_quant_conv.", [])]
    for part in ("encoder", "decoder"):
        p += [(f"{part}.conv_in.", f"{part}.conv_in.", []), (f"{part}.conv_out.", f"{part}.conv_out.", []),
              (f"{part}.conv_norm_out.", f"{part}.norm_out.", []),
              (f"{part}.mid_block.resnets.0.", f"{part}.mid.block_1.", shortcut),
              (f"{part}.mid_block.resnets.1.", f"{part}.mid.block_2.", shortcut),
              (f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.", _VAE_ATTENTION)]
    for i in range(n):
        for j in range(layers):
            p.append((f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}.", shortcut))
        p.append((f"encoder.down_blocks.{i}.downsamplers.0.conv.", f"encoder.down.{i}.downsample.conv.", []))
        for j in range(layers + 1):
            p.append((f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{n - 1 - i}.block.{j}.", shortcut))
        p.append((f"decoder.up_blocks.{i}.upsamplers.0.conv.", f"decoder.up.{n - 1 - i}.upsample.conv.", []))
    out = _rename(state, p, "first_stage_model.")
    for k, v in out.items():  # the mid-block attention is 1x1 convolutions in LDM
        if ".mid.attn_1." in k and k.endswith("weight") and v.ndim == 2:
            out[k] = v[:, :, None, None]
    return out


def clip_to_ldm(state: dict) -> dict:
    import torch

    out = {"cond_stage_model.transformer.text_model." + k.removeprefix("text_model."): v for k, v in state.items()}
    positions = state["embeddings.position_embedding.weight"].shape[0]
    out["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(positions)[None]
    return out


def openclip_to_ldm(state: dict, seed: int) -> dict:
    """SD 2.x's FrozenOpenCLIPEmbedder: diffusers' N layers become resblocks 0..N-1, plus resblock N, the layer
    that SD 2.x skips (it takes the penultimate layer's output, then ln_final)."""
    import torch

    state = {k.removeprefix("text_model."): v for k, v in state.items()}
    p = "cond_stage_model.model."
    hidden = state["embeddings.token_embedding.weight"].shape[1]
    out = {p + "token_embedding.weight": state["embeddings.token_embedding.weight"],
           p + "positional_embedding": state["embeddings.position_embedding.weight"],
           p + "ln_final.weight": state["final_layer_norm.weight"], p + "ln_final.bias": state["final_layer_norm.bias"]}
    layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.layers."))
    for i in range(layers):
        s, r = f"encoder.layers.{i}.", f"{p}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[r + f"attn.in_proj_{kind}"] = torch.cat([state[s + f"self_attn.{x}_proj.{kind}"] for x in "qkv"])
            out[r + f"attn.out_proj.{kind}"] = state[s + f"self_attn.out_proj.{kind}"]
            out[r + f"ln_1.{kind}"] = state[s + f"layer_norm1.{kind}"]
            out[r + f"ln_2.{kind}"] = state[s + f"layer_norm2.{kind}"]
            out[r + f"mlp.c_fc.{kind}"] = state[s + f"mlp.fc1.{kind}"]
            out[r + f"mlp.c_proj.{kind}"] = state[s + f"mlp.fc2.{kind}"]
    g = torch.Generator().manual_seed(seed)
    skipped = f"{p}transformer.resblocks.{layers - 1}."
    for k in [k for k in out if k.startswith(skipped)]:
        out[k.replace(skipped, f"{p}transformer.resblocks.{layers}.")] = torch.randn(out[k].shape, generator=g)
    out[p + "text_projection"] = torch.randn(hidden, hidden, generator=g)
    out[p + "logit_scale"] = torch.tensor(4.6052)
    return out


def to_ldm(folder: Path, family: str, seed: int = 0) -> dict:
    """The model folder's weights as one LDM-layout state dict."""
    import torch
    from safetensors.torch import load_file

    folder = Path(folder)
    unet_cfg = json.loads((folder / "unet" / "config.json").read_text())
    vae_cfg = json.loads((folder / "vae" / "config.json").read_text())
    te = load_file(folder / "text_encoder" / "model.safetensors")
    sd = {**unet_to_ldm(load_file(folder / "unet" / "diffusion_pytorch_model.safetensors"), unet_cfg),
          **vae_to_ldm(load_file(folder / "vae" / "diffusion_pytorch_model.safetensors"), vae_cfg),
          **(openclip_to_ldm(te, seed) if family == "sd2" else clip_to_ldm(te)),
          "alphas_cumprod": torch.linspace(0.999, 0.005, 1000), "model_ema.decay": torch.tensor(0.9999)}
    return {k: v.contiguous().clone() for k, v in sd.items()}


def write_single_file(folder: Path, path: Path, family: str, metadata: dict | None = None,
                      global_step: int | None = None, dtype=None) -> Path:
    """`.safetensors` (with optional metadata), or a `.ckpt` pickle ({"state_dict": ..., "global_step": ...})."""
    import torch
    from safetensors.torch import save_file

    sd = to_ldm(folder, family)
    if dtype is not None:
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    path = Path(path)
    if path.suffix == ".safetensors":
        save_file(sd, str(path), metadata=metadata)
    else:
        torch.save({"state_dict": sd, "global_step": global_step if global_step is not None else 1000}, path)
    return path


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3) or (sys.argv[2:] and sys.argv[2] not in ("sd1", "sd2")):
        sys.exit("usage: python tests/single_file_fixture.py OUT_DIR [sd1|sd2]")
    fam = sys.argv[2] if len(sys.argv) == 3 else "sd1"
    out = build_ldm_model(Path(sys.argv[1]), fam)
    print(write_single_file(out, out.with_suffix(".safetensors"), fam))
