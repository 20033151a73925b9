"""Train a ControlNet for the embedded model on the edges of its world: the control image is OpenCV's Canny map of
the rendered scene (thresholds 100/200, what `--control-preprocess canny` computes), so the net learns to put the
shape where the edges are, whatever the prompt says.

    python training/train_controlnet.py --model sdrt/embedded/model --out /tmp/embedded-canny

As ControlNet is trained (Zhang et al. 2023): the net starts as a copy of the U-Net's down path and mid block
(`ControlNetModel.from_unet`, zero convolutions at zero), the U-Net, text encoder and VAE stay frozen, the loss
is the U-Net's noise prediction error with the net's residuals added; prompts are dropped 10% of the time (so
guidance works) and, as the paper does for half of them, replaced by the empty prompt 40% of the time so the
net learns to read the image alone. Used for the README's ControlNet example; not shipped.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train  # noqa: E402
import world  # noqa: E402

RECIPE = {"seed": 11, "images": 16000, "steps": 2400, "batch": 64, "lr": 1e-3, "uncond_prob": 0.1,
          "empty_prompt_prob": 0.4, "min_snr_gamma": 5.0, "embedding": [16, 32, 96, 256]}


def canny_maps(images: np.ndarray) -> np.ndarray:
    """(N, 64, 64, 3) uint8 renders -> (N, 3, 64, 64) float32 in [0, 1]: sdrt's canny preprocessor, per image."""
    from PIL import Image

    from sdrt.runtime.preprocess import canny

    maps = [np.asarray(canny(Image.fromarray(im))) for im in images]
    return np.stack(maps).transpose(0, 3, 1, 2).astype(np.float32) / 255


def main(argv=None) -> None:
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
    from transformers import CLIPTextModel

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True, help="the text-to-image model (diffusers layout)")
    ap.add_argument("--out", type=Path, required=True, help="the ControlNet folder to write")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(RECIPE["seed"])
    r, started = RECIPE, time.perf_counter()
    vae = AutoencoderKL.from_pretrained(args.model / "vae", torch_dtype=torch.float32).eval()
    te = CLIPTextModel.from_pretrained(args.model / "text_encoder", torch_dtype=torch.float32).eval()
    unet = UNet2DConditionModel.from_pretrained(args.model / "unet", torch_dtype=torch.float32).eval()
    unet.requires_grad_(False)
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=tuple(r["embedding"])).train()
    scenes = world.sample_scenes(r["images"], seed=r["seed"])
    renders = world.render_batch(scenes)
    means, stds = train.encode_all(vae, renders)
    control = torch.from_numpy(canny_maps(renders))  # (N, 3, 64, 64)
    with torch.no_grad():
        text = te(train.token_ids([s.caption for s in scenes] + [""]))[0]  # frozen: encode once; [-1] is ""
    tune = train.FineTune(net.parameters(), r, "controlnet", means, stds, text, vae.config.scaling_factor)
    for step in range(r["steps"]):
        idx, noisy, noise, t, cond = tune.batch(step, r["uncond_prob"] + r["empty_prompt_prob"])
        down, mid = net(noisy, t, cond, control[idx], return_dict=False)
        eps = unet(noisy, t, cond, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
        tune.step(step, eps, noise, t)
    if args.out.exists():
        shutil.rmtree(args.out)
    net.eval().save_pretrained(args.out, safe_serialization=True)
    tune.finish(args.out / "training_controlnet.json", args.threads, started)


if __name__ == "__main__":
    main()
