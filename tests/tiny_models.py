"""Small random-weight Stable Diffusion models built in code (no downloads), saved in diffusers' layout.

SD1-style: epsilon prediction, conv projections, padded with <|endoftext|>, tokenizer as vocab.json +
merges.txt (the published layout). SD2-style: v_prediction, linear projections, padded with `!`,
tokenizer.json (newer saves). Both use the real CLIP vocabulary that sdrt ships.

Random weights give flat grey images that hide bugs, so a few layers are scaled up (`_add_contrast`):
the images get contrast and the prompt visibly changes them (tests check both).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import sdrt.export

VOCAB_DIR = Path(sdrt.export.__file__).parent / "clip_tokenizer"

SD1_SCHEDULER = {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                 "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "set_alpha_to_one": False,
                 "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None, "clip_sample": False,
                 "prediction_type": "epsilon"}
SD2_SCHEDULER = {"_class_name": "DDIMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                 "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "set_alpha_to_one": False,
                 "steps_offset": 1, "clip_sample": False, "prediction_type": "v_prediction",
                 "timestep_spacing": "leading"}


def _add_contrast(text_encoder, unet, vae, seed: int) -> None:
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        # Token embeddings large enough that different prompts give different conditioning.
        emb = text_encoder.get_input_embeddings().weight
        emb.copy_(torch.randn(emb.shape, generator=g) * 1.0)
        # Cross-attention output projections amplified so the text steers the U-Net.
        for name, p in unet.named_parameters():
            if "attn2.to_out.0.weight" in name:
                p.mul_(6.0)
        unet.conv_out.weight.mul_(4.0)
        vae.decoder.conv_out.weight.mul_(2.0)
        vae.decoder.conv_out.bias.copy_(torch.randn(vae.decoder.conv_out.bias.shape, generator=g) * 0.2)


def write_tokenizer_folder(folder: Path, pad: str) -> Path:
    """The published SD tokenizer layout: vocab.json + merges.txt and the special-token files."""
    folder.mkdir(parents=True, exist_ok=True)
    for f in ("vocab.json", "merges.txt"):
        shutil.copy(VOCAB_DIR / f, folder / f)
    specials = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                "pad_token": pad}
    (folder / "special_tokens_map.json").write_text(json.dumps(specials))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {**specials, "model_max_length": 77, "do_lower_case": True, "tokenizer_class": "CLIPTokenizer"}))
    return folder


def build_model(root: Path, family: str = "sd1", seed: int = 0, sample_size: int = 8, hidden: int = 32,
                channels: tuple = (32, 64), in_channels: int = 4) -> Path:
    """Write a random-weight model to root (diffusers layout) and return root. in_channels: 9 for an
    inpainting U-Net (latents, mask, masked-image latents), 5 for a depth2img one (latents, depth)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    sd2 = family == "sd2"
    torch.manual_seed(seed)
    te = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, projection_dim=hidden, bos_token_id=49406, eos_token_id=49407,
        pad_token_id=0 if sd2 else 49407, hidden_act="gelu" if sd2 else "quick_gelu")).eval()
    unet = UNet2DConditionModel(
        sample_size=sample_size, in_channels=in_channels, out_channels=4, layers_per_block=1, block_out_channels=channels,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=hidden, attention_head_dim=(2, 4) if sd2 else 8, use_linear_projection=sd2,
        norm_num_groups=8).eval()
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 16, 16, 16), layers_per_block=1,
        latent_channels=4, norm_num_groups=8, sample_size=sample_size * 8).eval()
    _add_contrast(te, unet, vae, seed)

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    te.save_pretrained(root / "text_encoder", safe_serialization=True)
    unet.save_pretrained(root / "unet", safe_serialization=True)
    vae.save_pretrained(root / "vae", safe_serialization=True)
    tok_dir = write_tokenizer_folder(root / "tokenizer", "!" if sd2 else "<|endoftext|>")
    if sd2:  # a newer save: tokenizer.json written by transformers, next to the legacy files
        CLIPTokenizer.from_pretrained(str(tok_dir)).save_pretrained(str(tok_dir))
        (tok_dir / "vocab.json").unlink()
        (tok_dir / "merges.txt").unlink()
    (root / "scheduler").mkdir(exist_ok=True)
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD2_SCHEDULER if sd2 else SD1_SCHEDULER))
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", (SD2_SCHEDULER if sd2 else SD1_SCHEDULER)["_class_name"]],
        "safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False}))
    return root


if __name__ == "__main__":  # python tests/tiny_models.py OUT [sd1|sd2]: a model to try sdrt without real weights
    import sys

    if len(sys.argv) not in (2, 3) or (sys.argv[2:] and sys.argv[2] not in ("sd1", "sd2")):
        sys.exit("usage: python tests/tiny_models.py OUT [sd1|sd2]")
    print(build_model(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) == 3 else "sd1"))
