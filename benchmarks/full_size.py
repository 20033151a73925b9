"""Stable Diffusion 1.5's published architecture with random weights: export it, then compare sdrt's image
with diffusers' on the same initial latents. Checks the exporter at full size (a 3.4 GB U-Net, so external
data) and gives first timings. Too slow for the test suite; run by hand:

    python benchmarks/full_size.py /tmp/sd15 --steps 3

Writes benchmarks/results/full_size_sd15.json. Timings depend on weight shapes, not values.
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np

from sdrt.bench import cpu_name  # one place that reads the CPU model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def build_sd15(root: Path) -> None:
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from tiny_models import SD1_SCHEDULER, write_tokenizer_folder
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    CLIPTextModel(CLIPTextConfig(  # OpenAI CLIP ViT-L/14's text tower
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768, bos_token_id=49406,
        eos_token_id=49407, pad_token_id=49407)).save_pretrained(root / "text_encoder")
    UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8,
                         block_out_channels=(320, 640, 1280, 1280), layers_per_block=2).save_pretrained(root / "unet")
    AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=512,
                  down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4).save_pretrained(root / "vae")
    write_tokenizer_folder(root / "tokenizer", "<|endoftext|>")
    (root / "scheduler").mkdir(exist_ok=True)
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD1_SCHEDULER))
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", "PNDMScheduler"]}))



def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("workdir", type=Path)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    src, bundle = args.workdir / "model", args.workdir / "bundle"
    if not (src / "model_index.json").exists():
        build_sd15(src)
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    import sdrt
    from sdrt.export import export_bundle

    import os

    result = {"machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version()},
              "command": " ".join(sys.argv), "steps": args.steps, "size": "512x512"}
    if not bundle.exists():
        t = time.perf_counter()
        manifest = export_bundle(src, bundle)
        result["export_s"] = round(time.perf_counter() - t, 1)
        result["export_peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
        result["unet_external_data_gb"] = round((bundle / "unet" / "model.onnx_data").stat().st_size / 2**30, 2)
        del manifest
    latents = np.random.default_rng(0).standard_normal((1, 4, 64, 64)).astype(np.float32)
    ref = StableDiffusionPipeline.from_pretrained(src, safety_checker=None, requires_safety_checker=False)
    ref.scheduler = EulerDiscreteScheduler.from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    t = time.perf_counter()
    want = ref("a photo of an astronaut", num_inference_steps=args.steps, latents=torch.from_numpy(latents),
               output_type="np").images[0]
    result["diffusers_s"] = round(time.perf_counter() - t, 1)
    pipe = sdrt.Pipeline.load(bundle)
    t = time.perf_counter()
    got = pipe.txt2img("a photo of an astronaut", steps=args.steps, latents=latents)[0]
    result["sdrt_s"] = round(time.perf_counter() - t, 1)
    got = np.asarray(got, np.float32) / 255
    result["max_pixel_diff_x255"] = round(float(np.abs(got - (want * 255).round() / 255).max() * 255), 3)
    print(json.dumps(result, indent=2))
    out = Path(__file__).parent / "results" / "full_size_sd15.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
