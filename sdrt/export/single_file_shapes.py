"""Model sizes read from a single-file checkpoint's tensor shapes (channels, layers, attention, text width), so
checkpoints that differ from the published configs (and the small ones tests build) convert faithfully. What
the weights cannot say is fixed by the family (see single_file_configs/SOURCE.md)."""
from __future__ import annotations

import re
from collections.abc import Mapping

from ..errors import SourceError

UNET = "model.diffusion_model."
VAE = "first_stage_model."
CLIP = "cond_stage_model.transformer."
CLIP_MODEL = CLIP + "text_model."
OPENCLIP = "cond_stage_model.model."

GROUP_NORM_GROUPS = 32  # LDM's normalization(): GroupNorm(32, C) in the U-Net and the VAE
SD1_UNET_HEADS = 8  # v1-inference.yaml: num_heads 8
SD2_UNET_HEAD_CHANNELS = 64  # v2-inference(-v).yaml: num_head_channels 64
TEXT_HEAD_CHANNELS = 64  # CLIP ViT-L/14: 768 / 12 heads; OpenCLIP ViT-H/14: 1024 / 16 heads


# ---------------------------------------------------------------------------------------------------------------
# Sizes from the weights


def indices(keys, prefix: str) -> list[int]:
    """The integers N of keys `prefix + "N." + ...`, sorted."""
    found = {int(m.group(1)) for k in keys if k.startswith(prefix) and (m := re.match(r"(\d+)\.", k[len(prefix):]))}
    return sorted(found)


def layout_error(ck: Mapping, what: str) -> SourceError:
    return SourceError(f"{str(ck.path)!r}: {what}; the file is damaged or a variant sdrt does not support")


def _check_divisible(ck: Mapping, channels, by: int, what: str) -> None:
    bad = [c for c in channels if c % by]
    if bad:
        raise layout_error(ck, f"{what} needs channel counts that are multiples of {by}; the weights have {bad[0]}")


def unet_config(ck: Mapping, family: str, base: dict, prefix: str = UNET, controlnet: bool = False) -> dict:
    """The U-Net's diffusers config from its weights under `prefix`; controlnet: a ControlNet's copy of the down
    path and mid block (no output blocks)."""
    keys = ck.keyset
    conv_in = ck.shape(prefix + "input_blocks.0.0.weight")  # (C0, in, 3, 3)
    levels, level = [], []
    for i in indices(keys, prefix + "input_blocks.")[1:]:
        p = f"{prefix}input_blocks.{i}."
        if p + "0.op.weight" in keys:  # a downsampler closes the level
            levels.append(level)
            level = []
            continue
        if p + "0.out_layers.3.weight" not in keys:
            raise layout_error(ck, f"U-Net input block {i} is neither a ResNet block nor a downsampler")
        level.append((ck.shape(p + "0.out_layers.3.weight")[0], p + "1.proj_in.weight" in keys))
    levels.append(level)
    per_level = {len(lv) for lv in levels}
    if len(per_level) != 1 or 0 in per_level or any(len(set(lv)) != 1 for lv in levels):
        raise layout_error(ck, "the U-Net's input blocks are not a regular ladder of levels")
    layers = per_level.pop()
    channels = [lv[0][0] for lv in levels]
    attention = [lv[0][1] for lv in levels]
    n_out = len(indices(keys, prefix + "output_blocks."))
    if not controlnet and n_out != len(levels) * (layers + 1):
        raise layout_error(ck, f"the U-Net has {n_out} output blocks where its input blocks imply "
                                f"{len(levels) * (layers + 1)}")
    if prefix + "middle_block.1.proj_in.weight" not in keys or not any(attention):
        raise layout_error(ck, "the U-Net has no cross-attention (model.diffusion_model.middle_block.1.*)")
    first = next((k for k in sorted(keys) if k.startswith(prefix) and k.endswith(".attn2.to_k.weight")), None)
    if first is None:
        raise layout_error(ck, "the U-Net has no cross-attention key projections (attn2.to_k)")
    attn_prefix = first.split("transformer_blocks.")[0]
    proj_in = ck.shape(attn_prefix + "proj_in.weight")
    _check_divisible(ck, channels, GROUP_NORM_GROUPS, "GroupNorm(32)")
    if family == "sd1":
        _check_divisible(ck, channels, SD1_UNET_HEADS, "SD 1.x's 8-head attention")
        heads = SD1_UNET_HEADS
    else:
        _check_divisible(ck, channels, SD2_UNET_HEAD_CHANNELS, "SD 2.x's 64-channel attention heads")
        heads = [c // SD2_UNET_HEAD_CHANNELS for c in channels]
    up = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)]
    out = {} if controlnet else {"out_channels": ck.shape(prefix + "out.2.weight")[0], "up_block_types": up}
    return {**base, **out, "in_channels": conv_in[1], "block_out_channels": channels, "layers_per_block": layers,
            "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
            "cross_attention_dim": ck.shape(first)[1], "use_linear_projection": len(proj_in) == 2,
            "transformer_layers_per_block": len(indices(keys, attn_prefix + "transformer_blocks.")),
            "attention_head_dim": heads, "norm_num_groups": GROUP_NORM_GROUPS}


def vae_config(ck: Mapping, base: dict) -> dict:
    keys = ck.keyset
    enc = VAE + "encoder."
    levels = indices(keys, enc + "down.")
    if not levels:
        raise layout_error(ck, "the VAE encoder has no down blocks")
    channels = [ck.shape(f"{enc}down.{i}.block.0.conv2.weight")[0] for i in levels]
    layers = {len(indices(keys, f"{enc}down.{i}.block.")) for i in levels}
    if len(layers) != 1:
        raise layout_error(ck, "the VAE's encoder levels have different numbers of ResNet blocks")
    _check_divisible(ck, channels, GROUP_NORM_GROUPS, "GroupNorm(32)")
    latent = ck.shape(VAE + "post_quant_conv.weight")[0] if VAE + "post_quant_conv.weight" in keys \
        else ck.shape(enc + "conv_out.weight")[0] // 2
    return {**base, "in_channels": ck.shape(enc + "conv_in.weight")[1],
            "out_channels": ck.shape(VAE + "decoder.conv_out.weight")[0], "block_out_channels": channels,
            "down_block_types": ["DownEncoderBlock2D"] * len(channels),
            "up_block_types": ["UpDecoderBlock2D"] * len(channels), "layers_per_block": layers.pop(),
            "latent_channels": latent, "norm_num_groups": GROUP_NORM_GROUPS}


def text_config(ck: Mapping, text: str, base: dict) -> dict:
    keys = ck.keyset
    if text == "clip":
        vocab, hidden = ck.shape(CLIP_MODEL + "embeddings.token_embedding.weight")
        positions = ck.shape(CLIP_MODEL + "embeddings.position_embedding.weight")[0]
        layers = len(indices(keys, CLIP_MODEL + "encoder.layers."))
        mlp = ck.shape(CLIP_MODEL + "encoder.layers.0.mlp.fc1.weight")[0]
    else:
        vocab, hidden = ck.shape(OPENCLIP + "token_embedding.weight")
        positions = ck.shape(OPENCLIP + "positional_embedding")[0]
        layers = len(indices(keys, OPENCLIP + "transformer.resblocks.")) - 1  # SD 2.x skips the last layer
        mlp = ck.shape(OPENCLIP + "transformer.resblocks.0.mlp.c_fc.weight")[0]
    if layers < 1:
        raise layout_error(ck, "the text encoder has no transformer layers")
    if vocab != base["vocab_size"]:
        raise layout_error(ck, f"the text encoder has {vocab} token embeddings where CLIP's tokenizer has "
                                f"{base['vocab_size']}")
    _check_divisible(ck, [hidden], TEXT_HEAD_CHANNELS, "CLIP's 64-channel attention heads")
    return {**base, "hidden_size": hidden, "intermediate_size": mlp, "num_hidden_layers": layers,
            "num_attention_heads": hidden // TEXT_HEAD_CHANNELS, "max_position_embeddings": positions}
