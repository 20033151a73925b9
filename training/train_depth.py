"""Fine-tune the embedded model into a depth-guided one, in Stable Diffusion 2 depth's layout: the U-Net takes
5 channels (the 4 latent channels + a depth map at latent size), text encoder and VAE unchanged.

    python training/train_depth.py --model sdrt/embedded/model --out /tmp/embedded-depth

In this world depth is the scene's silhouette: the shape is near (1), the background far (0). The map goes
through exactly what diffusers' StableDiffusionDepth2ImgPipeline.prepare_depth_map does with a given map
(bicubic to latent size, then min-max to [-1, 1] per image), so sdrt and diffusers feed the model what it
learnt from. The new input channel starts at zero, so training starts from the text-to-image model; only the
U-Net trains. Used for the README's depth2img example; not shipped (a second bundle would double the package).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train  # noqa: E402
import world  # noqa: E402

RECIPE = {"seed": 7, "images": 16000, "steps": 900, "batch": 64, "lr": 3e-4, "uncond_prob": 0.1, "min_snr_gamma": 5.0}


def depth_maps(scenes: list[world.Scene]) -> np.ndarray:
    """(N, 64, 64) float32: 1 on the shape, 0 on the background (the renderer's antialiased coverage)."""
    silhouettes = [dataclasses.replace(s, color="white", background="black") for s in scenes]
    return world.render_batch(silhouettes).mean(axis=-1).astype(np.float32) / 255


def depth_condition(depth: torch.Tensor, latent: int) -> torch.Tensor:
    """(N, 64, 64) -> (N, 1, latent, latent) in [-1, 1], as diffusers' prepare_depth_map does with a given map."""
    d = torch.nn.functional.interpolate(depth[:, None], size=(latent, latent), mode="bicubic", align_corners=False)
    lo, hi = d.amin(dim=(1, 2, 3), keepdim=True), d.amax(dim=(1, 2, 3), keepdim=True)
    return 2.0 * (d - lo) / (hi - lo) - 1.0


def five_channel_unet(unet):
    """The same U-Net with conv_in taking one more (zero-weighted) channel."""
    from diffusers import UNet2DConditionModel

    new = UNet2DConditionModel.from_config({**unet.config, "in_channels": 5})
    state = unet.state_dict()
    weight = state.pop("conv_in.weight")  # (C, 4, 3, 3)
    new.load_state_dict(state, strict=False)
    with torch.no_grad():
        new.conv_in.weight.zero_()
        new.conv_in.weight[:, :4] = weight
    return new


def main(argv=None) -> None:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True, help="the text-to-image model (diffusers layout)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(RECIPE["seed"])
    r, started = RECIPE, time.perf_counter()
    vae = AutoencoderKL.from_pretrained(args.model / "vae", torch_dtype=torch.float32).eval()
    te = CLIPTextModel.from_pretrained(args.model / "text_encoder", torch_dtype=torch.float32).eval()
    unet = five_channel_unet(UNet2DConditionModel.from_pretrained(args.model / "unet", torch_dtype=torch.float32))
    scenes = world.sample_scenes(r["images"], seed=r["seed"])
    means, stds = train.encode_all(vae, world.render_batch(scenes))
    depth = depth_condition(torch.from_numpy(depth_maps(scenes)), means.shape[-1])
    with torch.no_grad():
        text = te(train.token_ids([s.caption for s in scenes] + [""]))[0]  # frozen: encode once; [-1] is ""
    tune = train.FineTune(unet.parameters(), r, "depth unet", means, stds, text, vae.config.scaling_factor)
    for step in range(r["steps"]):
        idx, noisy, noise, t, cond = tune.batch(step, r["uncond_prob"])
        sample = torch.cat([noisy, depth[idx]], dim=1)  # (B, 5, 8, 8)
        tune.step(step, unet(sample, t, cond).sample, noise, t)
    if args.out.exists():
        shutil.rmtree(args.out)
    shutil.copytree(args.model, args.out, ignore=shutil.ignore_patterns("unet", "training.json"))
    unet.eval().to(torch.float16).save_pretrained(args.out / "unet", safe_serialization=True)
    index = json.loads((args.out / "model_index.json").read_text())
    index["_class_name"] = "StableDiffusionDepth2ImgPipeline"
    (args.out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    tune.finish(args.out / "training_depth.json", args.threads, started)


if __name__ == "__main__":
    main()
