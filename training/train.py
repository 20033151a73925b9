"""Train the embedded model from scratch on the synthetic world (training/world.py), on CPU, from a fixed seed.

    nice python training/train.py --out /tmp/embedded-model          # the documented run (see RECIPE)

Stable Diffusion's architecture at toy size: an AutoencoderKL (64x64x3 <-> 8x8x4, SD's 8x downsampling),
a CLIPTextModel over the real CLIP tokenizer (SD 1.x padding with <|endoftext|>), and a
UNet2DConditionModel with cross-attention, trained as SD was: epsilon prediction under the scaled_linear
schedule (betas 0.00085..0.012, 1000 steps), with the caption dropped 10 % of the time so classifier-free
guidance works. Stages:

1. VAE on rendered images (L1 + MSE reconstruction, KL weight 1e-6 as in SD).
2. Encode the whole dataset once (the posterior's mean and std), so the U-Net stage never runs the VAE.
3. Text encoder and U-Net together; the text encoder at a lower learning rate.

The result is written in diffusers' layout with float16 safetensors (the shipped weights stay small).
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import world  # noqa: E402

TOKENIZER_DIR = Path(__file__).resolve().parents[1] / "sdrt" / "export" / "clip_tokenizer"  # = shared/data/clip-tokenizer
RECIPE = {  # the documented run; --quick scales the step counts down for trials
    "seed": 0, "images": 40000,
    "vae_steps": 2500, "vae_batch": 24, "vae_lr": 1e-3, "vae_kl": 1e-6, "vae_init_logvar": -8.0,
    "unet_steps": 7000, "unet_batch": 64, "unet_lr": 1e-3, "text_lr": 2e-4, "uncond_prob": 0.1, "min_snr_gamma": 5.0,
    "text_hidden": 32, "unet_channels": (40, 80), "vae_channels": (16, 32, 32, 32),
}
SCHEDULER = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.42.1", "beta_start": 0.00085,
             "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
             "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
             "clip_sample": False, "prediction_type": "epsilon"}
SPECIAL_TOKENS = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                  "pad_token": "<|endoftext|>"}


# -- the three models ------------------------------------------------------------------------------------
def make_vae(channels):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=tuple(channels),
                         layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=world.SIZE)


def make_text_encoder(hidden: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    # Full CLIP vocabulary (the real tokenizer can emit any id); only ~20 rows are ever trained.
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=hidden, hidden_act="quick_gelu",
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407))


def make_unet(channels, text_hidden: int):
    from diffusers import UNet2DConditionModel

    n = len(channels)
    return UNet2DConditionModel(
        sample_size=world.SIZE // 8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=tuple(channels), down_block_types=("CrossAttnDownBlock2D",) * n,
        up_block_types=("CrossAttnUpBlock2D",) * n, cross_attention_dim=text_hidden,
        attention_head_dim=4, norm_num_groups=8)


def tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer(str(TOKENIZER_DIR / "vocab.json"), str(TOKENIZER_DIR / "merges.txt"),
                         model_max_length=77, **SPECIAL_TOKENS)


# -- helpers -----------------------------------------------------------------------------------------------
def lr_at(step: int, total: int, peak: float, warmup: int = 200) -> float:
    """Linear warm-up, then cosine decay to 5 % of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def set_lr(opt, step: int, total: int) -> None:
    for group in opt.param_groups:
        group["lr"] = lr_at(step, total, group["peak_lr"])


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """(N, 64, 64, 3) uint8 -> (N, 3, 64, 64) float in [-1, 1], as SD's VAE sees images."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


class Log:
    def __init__(self, name: str, every: int):
        self.name, self.every, self.sums, self.count, self.t0 = name, every, {}, 0, time.perf_counter()

    def add(self, step: int, total: int, **losses: float) -> None:
        for k, v in losses.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.count += 1
        if (step + 1) % self.every == 0 or step + 1 == total:
            means = " ".join(f"{k} {v / self.count:.5f}" for k, v in self.sums.items())
            print(f"[{self.name}] step {step + 1}/{total} {means} ({time.perf_counter() - self.t0:.0f}s)", flush=True)
            self.last = {k: v / self.count for k, v in self.sums.items()}
            self.sums, self.count = {}, 0


class Checkpoint:
    """Resumable loops: modules, optimizer, random stream and step, saved every `every` steps. The
    machine is shared and a long run may be killed; a resumed run draws the same batches and noise, so
    it ends where an unbroken one would. `elapsed` carries the training time across resumes."""

    def __init__(self, path: Path | None, key: dict, every: int = 100):
        self.path, self.key, self.every, self.elapsed = path, key, every, 0.0
        self.t0 = time.perf_counter()

    def restore(self, modules: list, opt, gen: torch.Generator) -> int:
        if not (self.path and self.path.is_file()):
            return 0
        saved = torch.load(self.path, weights_only=False)
        if saved["key"] != self.key:
            return 0
        for m, state in zip(modules, saved["modules"]):
            m.load_state_dict(state)
        opt.load_state_dict(saved["opt"])
        gen.set_state(saved["gen"])
        self.elapsed = saved["elapsed"]
        print(f"resumed {self.path.name} at step {saved['step']}", flush=True)
        return saved["step"]

    def seconds(self) -> float:
        return self.elapsed + time.perf_counter() - self.t0

    def maybe_save(self, step: int, modules: list, opt, gen: torch.Generator) -> None:
        if self.path and step % self.every == 0:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            torch.save({"key": self.key, "step": step, "modules": [m.state_dict() for m in modules],
                        "opt": opt.state_dict(), "gen": gen.get_state(), "elapsed": self.seconds()}, tmp)
            tmp.replace(self.path)


def edge_l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """L1 between the images' horizontal and vertical differences: pixel losses alone let a briefly
    trained decoder round a small square's corners; this term is zero only when the edges are as sharp."""
    return ((a[..., 1:, :] - a[..., :-1, :]) - (b[..., 1:, :] - b[..., :-1, :])).abs().mean() + \
        ((a[..., :, 1:] - a[..., :, :-1]) - (b[..., :, 1:] - b[..., :, :-1])).abs().mean()


# -- stage 1: VAE --------------------------------------------------------------------------------------
def train_vae(images: np.ndarray, r: dict, gen: torch.Generator, ckpt: Checkpoint):
    vae = make_vae(r["vae_channels"])
    with torch.no_grad():
        # Start the posterior narrow (std ~0.02 instead of 1), as a trained SD VAE's is: otherwise the
        # decoder spends most of a short run learning to ignore sampling noise, and decodes blurred edges.
        vae.quant_conv.bias[vae.config.latent_channels:] = r["vae_init_logvar"]
    opt = torch.optim.AdamW([{"params": vae.parameters(), "peak_lr": r["vae_lr"]}], weight_decay=0.0)
    log = Log("vae", 100)
    for step in range(ckpt.restore([vae], opt, gen), r["vae_steps"]):
        ckpt.maybe_save(step, [vae], opt, gen)
        set_lr(opt, step, r["vae_steps"])
        idx = torch.randint(0, len(images), (r["vae_batch"],), generator=gen).numpy()
        x = to_tensor(images[idx])
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample
        l1, mse = (recon - x).abs().mean(), (recon - x).pow(2).mean()
        edge = edge_l1(recon, x)
        kl = posterior.kl().mean() / x[0].numel()  # per pixel, as the reconstruction terms are
        loss = l1 + mse + edge + r["vae_kl"] * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        log.add(step, r["vae_steps"], l1=l1.item(), mse=mse.item(), edge=edge.item(), kl=kl.item())
    return vae.eval(), log.last


@torch.no_grad()
def encode_all(vae, images: np.ndarray, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """The posterior's mean and std for every image: (N, 4, 8, 8) each."""
    means, stds = [], []
    for i in range(0, len(images), batch):
        d = vae.encode(to_tensor(images[i:i + batch])).latent_dist
        means.append(d.mean)
        stds.append(d.std)
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def check_reconstructions(vae, seed: int, n: int = 300) -> dict:
    """The evaluator's reading of VAE reconstructions of every combo: the ceiling for the whole model."""
    import evaluate

    scenes = world.sample_scenes(n, seed, combos=world.all_combos())
    recon = vae.decode(vae.encode(to_tensor(world.render_batch(scenes))).latent_dist.mean).sample
    recon = ((recon.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    result = evaluate.tally([evaluate.score(evaluate.read(im), s) for im, s in zip(recon, scenes)])
    print(f"VAE reconstructions read right: {json.dumps(result)}", flush=True)
    return result


# -- stage 3: text encoder + U-Net ----------------------------------------------------------------------
def token_ids(captions: list[str]) -> torch.Tensor:
    tok = tokenizer()
    return torch.tensor(tok(captions, padding="max_length", max_length=77, truncation=True).input_ids)


def min_snr_weights(sched, gamma: float) -> torch.Tensor:
    """Per-timestep loss weight min(SNR, gamma) / SNR for epsilon prediction (Hang et al. 2023): the
    nearly clean timesteps, which only polish detail, stop dominating the gradient, and the noisy ones
    that decide colour and shape get the model's attention; converges several times faster."""
    alphas = sched.alphas_cumprod
    snr = alphas / (1 - alphas)
    return torch.clamp(snr, max=gamma) / snr


class FineTune:
    """What the fine-tuning scripts (train_depth.py, train_controlnet.py) share: the scheduler, min-SNR weights,
    optimizer, random stream and log, and each step's batch of noised latents, its captions (the empty prompt
    with probability `drop`) and the loss step. The draws come in one order: the batch, the latents' sample,
    the prompt drops, the noise, the timesteps."""

    def __init__(self, params, r: dict, name: str, means, stds, text, scaling: float):
        from diffusers import DDPMScheduler

        self.r, self.params, self.means, self.stds, self.text, self.scaling = r, list(params), means, stds, text, scaling
        self.sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                   num_train_timesteps=1000)
        self.weights = min_snr_weights(self.sched, r["min_snr_gamma"])
        self.opt = torch.optim.AdamW([{"params": self.params, "peak_lr": r["lr"]}], weight_decay=0.0)
        self.gen, self.log = torch.Generator().manual_seed(r["seed"]), Log(name, 100)

    def batch(self, step: int, drop: float):
        """(idx, noisy latents, noise, t, captions) for `step`; text[-1] is the empty prompt."""
        set_lr(self.opt, step, self.r["steps"])
        b, gen, means, stds = self.r["batch"], self.gen, self.means, self.stds
        idx = torch.randint(0, len(means), (b,), generator=gen)
        z = (means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=gen)) * self.scaling
        cond = self.text[idx].clone()
        cond[torch.rand(b, generator=gen) < drop] = self.text[-1]
        noise, t = torch.randn(z.shape, generator=gen), torch.randint(0, 1000, (b,), generator=gen)
        return idx, self.sched.add_noise(z, noise, t), noise, t, cond

    def finish(self, path: Path, threads: int, started: float) -> None:
        """The run's summary (recipe, threads, wall time, last losses) into `path`, and on stdout."""
        summary = {"recipe": self.r, "threads": threads, "wall_s": round(time.perf_counter() - started),
                   "loss": self.log.last}
        path.write_text(json.dumps(summary, indent=2) + "\n")
        print("done", json.dumps(summary), flush=True)

    def step(self, step: int, eps, noise, t) -> None:
        mse = (eps - noise).pow(2).mean(dim=(1, 2, 3))
        loss = (mse * self.weights[t]).mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.log.add(step, self.r["steps"], loss=loss.item(), eps_mse=mse.mean().item())


def train_diffusion(means, stds, ids: torch.Tensor, scaling: float, r: dict, gen: torch.Generator,
                    ckpt: Checkpoint):
    from diffusers import DDPMScheduler

    te, unet = make_text_encoder(r["text_hidden"]), make_unet(r["unet_channels"], r["text_hidden"])
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          num_train_timesteps=1000)
    weights = min_snr_weights(sched, r["min_snr_gamma"])
    uncond = token_ids([""])[0]
    opt = torch.optim.AdamW([{"params": unet.parameters(), "peak_lr": r["unet_lr"]},
                             {"params": te.parameters(), "peak_lr": r["text_lr"]}], weight_decay=0.0)
    log = Log("unet", 100)
    total, b = r["unet_steps"], r["unet_batch"]
    for step in range(ckpt.restore([te, unet], opt, gen), total):
        ckpt.maybe_save(step, [te, unet], opt, gen)
        set_lr(opt, step, total)
        idx = torch.randint(0, len(means), (b,), generator=gen)
        z = (means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=gen)) * scaling
        batch_ids = ids[idx].clone()
        batch_ids[torch.rand(b, generator=gen) < r["uncond_prob"]] = uncond  # caption dropout, for CFG
        noise = torch.randn(z.shape, generator=gen)
        t = torch.randint(0, 1000, (b,), generator=gen)
        pred = unet(sched.add_noise(z, noise, t), t, te(batch_ids)[0]).sample
        mse = (pred - noise).pow(2).mean(dim=(1, 2, 3))
        loss = (mse * weights[t]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([*unet.parameters(), *te.parameters()], 1.0)
        opt.step()
        log.add(step, total, loss=loss.item(), eps_mse=mse.mean().item())
    return te.eval(), unet.eval(), log.last


# -- writing the model ---------------------------------------------------------------------------------
def save_model(out: Path, te, unet, vae) -> None:
    """diffusers' layout, float16 safetensors, CLIP tokenizer files, SD 1.5's PNDM scheduler config."""
    out.mkdir(parents=True, exist_ok=True)
    for name, module in (("text_encoder", te), ("unet", unet), ("vae", vae)):
        module.to(torch.float16).save_pretrained(out / name, safe_serialization=True)
        module.to(torch.float32)
    tok_dir = out / "tokenizer"
    tok_dir.mkdir(exist_ok=True)
    for f in ("vocab.json", "merges.txt"):
        shutil.copy(TOKENIZER_DIR / f, tok_dir / f)
    (tok_dir / "special_tokens_map.json").write_text(json.dumps(SPECIAL_TOKENS, indent=2) + "\n")
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(
        {**SPECIAL_TOKENS, "model_max_length": 77, "do_lower_case": True, "tokenizer_class": "CLIPTokenizer"},
        indent=2) + "\n")
    (out / "scheduler").mkdir(exist_ok=True)
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER, indent=2) + "\n")
    (out / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", "PNDMScheduler"], "safety_checker": [None, None],
        "feature_extractor": [None, None], "image_encoder": [None, None], "requires_safety_checker": False},
        indent=2) + "\n")


def stage_vae(r: dict, images: np.ndarray, work: Path | None):
    """Stages 1 and 2, or their saved result from an earlier run of the same recipe (--work)."""
    key = {k: v for k, v in r.items() if k == "seed" or k == "images" or k.startswith("vae")}
    cache = work / "stage1.pt" if work else None
    vae = make_vae(r["vae_channels"])
    if cache and cache.is_file():
        saved = torch.load(cache)
        if saved["key"] == key:
            vae.load_state_dict(saved["vae"])
            print(f"stage 1 from {cache} (trained in {saved['wall_s']}s)", flush=True)
            return vae.eval(), saved["means"], saved["stds"], saved["loss"], saved["wall_s"]
    ckpt = Checkpoint(work / "vae.ckpt" if work else None, key)
    torch.manual_seed(r["seed"])
    vae, loss = train_vae(images, r, torch.Generator().manual_seed(r["seed"]), ckpt)
    means, stds = encode_all(vae, images)
    wall = round(ckpt.seconds())
    loss["reconstructions_read_right"] = check_reconstructions(vae, r["seed"] + 2)
    if cache:
        work.mkdir(parents=True, exist_ok=True)
        torch.save({"key": key, "vae": vae.state_dict(), "means": means, "stds": stds, "loss": loss,
                    "wall_s": wall}, cache)
    return vae, means, stds, loss, wall


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="Train the embedded model (see the module docstring).")
    ap.add_argument("--out", type=Path, required=True, help="folder for the diffusers-layout model")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", type=float, default=1.0, help="scale every step count (trials: 0.1)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=JSON", help="override a RECIPE entry")
    ap.add_argument("--work", type=Path, default=None,
                    help="checkpoints: a killed run started again with the same --work resumes where it was")
    args = ap.parse_args(argv)
    r = dict(RECIPE)
    for kv in args.set:
        k, v = kv.split("=", 1)
        r[k] = json.loads(v)
    for k in ("vae_steps", "unet_steps", "images"):
        r[k] = max(1, int(r[k] * args.quick))
    torch.set_num_threads(args.threads)
    print("recipe", json.dumps(r), flush=True)
    started = time.perf_counter()

    scenes = world.sample_scenes(r["images"], seed=r["seed"])  # training combos only
    images = world.render_batch(scenes)
    vae, means, stds, vae_loss, vae_wall = stage_vae(r, images, args.work)
    scaling = float(1.0 / means.std())  # unit-variance latents, as SD's 0.18215 was chosen
    vae.register_to_config(scaling_factor=scaling)
    print(f"latent std {means.std():.4f} -> scaling_factor {scaling:.5f} ({time.perf_counter() - started:.0f}s)",
          flush=True)
    torch.manual_seed(r["seed"] + 1)  # each stage seeds itself, so a reused stage 1 changes nothing here
    ids = token_ids([s.caption for s in scenes])
    ckpt = Checkpoint(args.work / "unet.ckpt" if args.work else None, r)
    te, unet, unet_loss = train_diffusion(means, stds, ids, scaling, r,
                                          torch.Generator().manual_seed(r["seed"] + 1), ckpt)
    save_model(args.out, te, unet, vae)
    summary = {"recipe": r, "threads": args.threads, "torch": torch.__version__,
               "wall_s": {"vae_and_encoding": vae_wall, "text_encoder_and_unet": round(ckpt.seconds()),
                          "this_process": round(time.perf_counter() - started)},
               "final_losses": {"vae": vae_loss, "unet": unet_loss}}
    (args.out / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("done", json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
