"""Tiny random ControlNets for the test models (tiny_models.py), built in code.

`ControlNetModel.from_unet` copies the U-Net's down path and mid block (so the residuals fit it), with the
published conditioning embedding (16, 32, 96, 256): three stride-2 convolutions, image = 8 x latent, as the
test VAE's. A fresh ControlNet's zero convolutions (the residual projections and the embedding's conv_out) make
it output zeros: they are re-initialised here so that the control image visibly steers the image (tests check).

`to_ldm(controlnet)` writes its weights in the original ControlNet layout (control_model.*) that model sites
distribute, the reverse of diffusers' single-file conversion.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from single_file_fixture import _rename, down_path_to_ldm  # noqa: E402

EMBEDDING = (16, 32, 96, 256)


def build_controlnet(model_dir: Path, out: Path, seed: int = 0, scale: float = 1.0) -> Path:
    """A ControlNetModel folder fitting model_dir's U-Net; scale: the re-initialised zero convs' spread."""
    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(model_dir / "unet")
    torch.manual_seed(seed)
    cn = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=EMBEDDING).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for conv in [*cn.controlnet_down_blocks, cn.controlnet_mid_block, cn.controlnet_cond_embedding.conv_out]:
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * scale / conv.weight[0].numel() ** 0.5)
            conv.bias.copy_(torch.randn(conv.bias.shape, generator=g) * 0.1 * scale)
        emb = cn.controlnet_cond_embedding  # its default init all but loses the image over 8 convolutions
        for conv in [emb.conv_in, *emb.blocks, emb.conv_out]:
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 2.0 / conv.weight[0].numel() ** 0.5)
            conv.bias.zero_()
    cn.save_pretrained(out, safe_serialization=True)
    return out


def to_ldm(state: dict, config: dict, prefix: str = "control_model.") -> dict:
    """diffusers ControlNetModel weights -> the original layout (input_blocks, zero_convs, input_hint_block)."""
    p, idx = down_path_to_ldm(config)
    p += [("controlnet_cond_embedding.conv_in.", "input_hint_block.0.", []),
          ("controlnet_cond_embedding.conv_out.", f"input_hint_block.{2 * (2 * len(EMBEDDING) - 1)}.", []),
          ("controlnet_mid_block.", "middle_block_out.0.", [])]
    for j in range(2 * (len(EMBEDDING) - 1)):
        p.append((f"controlnet_cond_embedding.blocks.{j}.", f"input_hint_block.{2 * (j + 1)}.", []))
    for k in range(idx):
        p.append((f"controlnet_down_blocks.{k}.", f"zero_convs.{k}.0.", []))
    return _rename(state, p, prefix)


def write_single_file(folder: Path, path: Path, prefix: str = "control_model.") -> Path:
    import json

    from safetensors.torch import load_file, save_file

    state = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    config = json.loads((folder / "config.json").read_text())
    save_file({k: v.contiguous() for k, v in to_ldm(state, config, prefix).items()}, str(path))
    return path
