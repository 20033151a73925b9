"""Stable Diffusion 1.5's and 2.1's published architectures with random weights (timings depend on weight shapes,
not values): build the diffusers folder, export it with `sdrt export` in a child process (export time, the
export's peak memory), and record what the bundle holds. The side-by-side timings come from compare.py on the
result (the command is printed). Too slow for the test suite; run by hand:

    python benchmarks/full_size.py sd15 /tmp/sd15     # 512x512, epsilon
    python benchmarks/full_size.py sd21 /tmp/sd21     # 768x768, v-prediction, OpenCLIP-H text tower

Writes benchmarks/results/full_size_{sd15,sd21}.json.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

FAMILIES = {  # text tower, U-Net and VAE as in the published model_index folders
    "sd15": {"size": 512, "text": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                       num_attention_heads=12, hidden_act="quick_gelu", projection_dim=768),
             "unet": dict(attention_head_dim=8, cross_attention_dim=768), "pad": "<|endoftext|>", "sd2": False},
    "sd21": {"size": 768, "text": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                                       num_attention_heads=16, hidden_act="gelu", projection_dim=512),
             "unet": dict(attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024, use_linear_projection=True,
                          upcast_attention=True), "pad": "!", "sd2": True},
}


def build(family: str, root: Path) -> None:
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from tiny_models import SD1_SCHEDULER, SD2_SCHEDULER, write_tokenizer_folder
    from transformers import CLIPTextConfig, CLIPTextModel

    f = FAMILIES[family]
    torch.manual_seed(0)
    CLIPTextModel(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                                 pad_token_id=49407 if not f["sd2"] else 0, **f["text"])
                  ).save_pretrained(root / "text_encoder")
    UNet2DConditionModel(sample_size=f["size"] // 8, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                         **f["unet"]).save_pretrained(root / "unet")
    AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                  sample_size=f["size"], down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4).save_pretrained(root / "vae")
    write_tokenizer_folder(root / "tokenizer", f["pad"])
    scheduler = SD2_SCHEDULER if f["sd2"] else SD1_SCHEDULER
    (root / "scheduler").mkdir(exist_ok=True)
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", scheduler["_class_name"]]}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("family", choices=sorted(FAMILIES))
    ap.add_argument("workdir", type=Path)
    args = ap.parse_args()
    from sdrt.bench import machine_info, versions

    src, bundle = args.workdir / "model", args.workdir / "bundle"
    if not (src / "model_index.json").exists():
        build(args.family, src)
    result = {"command": shlex.join(["python", "benchmarks/full_size.py", *sys.argv[1:]]),
              "machine": machine_info(None), "versions": versions(), "family": args.family,
              "size": FAMILIES[args.family]["size"]}
    if not bundle.exists():
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "sdrt.cli", "export", str(src), "--out", str(bundle)], check=True)
        result["export_s"] = round(time.perf_counter() - started, 1)
        result["export_peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20, 2)
    manifest = json.loads((bundle / "sdrt.json").read_text())
    result["bundle_gb"] = round(sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file()) / 2**30, 2)
    result["cpu_graphs"] = manifest.get("cpu_graphs", {})
    result["verification"] = manifest["verification"]
    result["next"] = (f"python benchmarks/compare.py {bundle} {src} --steps 3 --runs 2 --warmup 1 "
                      f"--json benchmarks/results/compare_{args.family}.json")
    print(json.dumps(result, indent=2))
    out = ROOT / "benchmarks" / "results" / f"full_size_{args.family}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}; side by side: {result['next']}", file=sys.stderr)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    main()
