"""The Stable Diffusion pipeline over a bundle: tokenize, encode, denoise, decode. Pure numpy around the engines.

The denoise loop (Rombach et al. 2022, with classifier-free guidance, Ho & Salimans 2022) is `_denoise`;
everything else prepares its inputs or checks its outputs.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .. import __version__
from ..errors import BundleCorrupt, InvalidRequest, NonFiniteOutput
from . import names, request
from . import lora
from . import watermark as _watermark
from .embeddings import load_embedding
from .engine import Engine, OrtEngine
from .lora import Lora
from .images import a1111_parameters, to_pil
from .manifest import Manifest, load_manifest, read_json
from .samplers import Sampler, SchedulerConfig, make_sampler
from .text import TextEncoder, TextOptions
from .tokenizer import ClipTokenizer

BACKENDS = ("auto", "onnxruntime")
Progress = Callable[[int, int], None]


class Pipeline:
    def __init__(self, path: Path, manifest: Manifest, engines: dict[str, Engine], text: TextEncoder,
                 scheduler_config: dict):
        self.path, self.manifest, self.engines = path, manifest, engines
        self.text, self.tokenizer, self.scheduler_config = text, text.tokenizer, scheduler_config
        self.loras: tuple[Lora, ...] = ()  # applied to the U-Net and text encoder engines now
        self.lora_dirs: list[Path] = []  # where <lora:name:w> prompt tags are looked up
        self._patched: set[str] = set()  # components whose engines run on patched weights

    @classmethod
    def load(cls, path: str | Path, backend: str = "auto", threads: int | None = None) -> "Pipeline":
        """Validate the bundle's manifest and hashes, then open its graphs."""
        if backend not in BACKENDS:
            raise InvalidRequest(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")
        path = Path(path).expanduser()
        manifest = load_manifest(path)
        engines = {comp: OrtEngine(path / g.path, comp, threads) for comp, g in manifest.graphs.items()
                   if comp in names.REQUIRED_COMPONENTS}
        _check_io(manifest, engines)
        tokenizer = ClipTokenizer.from_folder(path / "tokenizer", manifest.tokenizer_max_length,
                                              manifest.tokenizer_pad_id)
        table = _token_embeddings(path, manifest) if manifest.token_embeddings else None
        sched_file = path / "scheduler" / "scheduler_config.json"
        sched = read_json(sched_file) if sched_file.exists() else {}
        sched["prediction_type"] = manifest.prediction_type
        SchedulerConfig.from_dict(sched)  # refuse an unusable config at load, not at the first request
        return cls(path, manifest, engines, TextEncoder(engines, tokenizer, table), sched)

    def load_embedding(self, path: str | Path, trigger: str | None = None, allow_pickle: bool = False) -> str:
        """Load a textual-inversion embedding (A1111 .pt/.safetensors, diffusers learned_embeds); its trigger
        word (the file name, the file's token, or `trigger`) in a prompt then uses its vectors. Returns it."""
        loaded = load_embedding(path, self.manifest.text_hidden_size, trigger, allow_pickle)
        if not self.text.takes_embeddings:
            raise InvalidRequest("textual-inversion embeddings need a text encoder that takes token embeddings; "
                                 "this bundle's takes token ids (an optimum export or an older sdrt bundle): "
                                 "re-export it with `sdrt export`")
        self.text.embeddings.update(loaded)
        return next(iter(loaded))

    def set_loras(self, loras) -> None:
        """Apply LoRAs [(file, weight), ...] to the U-Net and text encoder (several at once add up); an empty
        list restores the base weights exactly. Only graphs whose weights change are reopened."""
        wanted = tuple(Lora(Path(p).expanduser(), _lora_weight(w, p)) for p, w in loras)
        if wanted == self.loras:
            return
        patches = lora.overrides(self.path, list(wanted))
        for comp in names.LORA_COMPONENTS:
            if comp in patches or comp in self._patched:
                old = self.engines[comp]
                self.engines[comp] = OrtEngine(old.path, comp, old.threads, patches.get(comp))
        self._patched = set(patches)
        self.loras = wanted

    def _request_loras(self, prompt: str, loras) -> list[tuple[Path, float]]:
        """--lora files plus the prompt's <lora:name:w> tags, resolved in lora_dirs."""
        _, tags = lora.parse_tags(prompt)
        return [*(loras or []), *((lora.resolve(name, self.lora_dirs), w) for name, w in tags)]

    # -- the three stages -------------------------------------------------------------------------
    def encode_prompt(self, prompts: list[str], options: TextOptions = TextOptions()) -> np.ndarray:
        """(N, 77·k, D): prompts in A1111's syntax, each padded to the longest one's k chunks."""
        return _finite(self.text.encode(prompts, options), "text encoder")

    def _denoise(self, x: np.ndarray, text: np.ndarray, sampler: Sampler, guidance: float, noise,
                 start: int = 0, progress: Progress | None = None) -> np.ndarray:
        """x: (B, 4, h, w) noised latents; text: (2B, 77, D) [uncond; cond] with guidance, else (B, 77, D)."""
        cfg = guidance > 1.0  # diffusers' convention: scales <= 1 run the conditional branch alone
        unet, total = self.engines[names.UNET], len(sampler.timesteps)
        scalar_t = len(unet.inputs[names.TIMESTEP].shape) == 0  # optimum's graphs take one scalar timestep
        for i in range(start, total):
            x_in = np.concatenate([x, x]) if cfg else x
            t = np.float32(sampler.timesteps[i]) if scalar_t else np.full(len(x_in), sampler.timesteps[i], np.float32)
            eps = unet(**{names.SAMPLE: sampler.scale_model_input(x_in, i), names.TIMESTEP: t,
                          names.ENCODER_HIDDEN_STATES: text})[names.OUT_SAMPLE]
            eps = _finite(np.asarray(eps, np.float32), "U-Net", step=i)  # no copy when already fp32
            if cfg:
                uncond, cond = np.split(eps, 2)
                eps = uncond + np.float32(guidance) * (cond - uncond)
            x = sampler.step(eps, i, x, noise)
            if progress:
                progress(i + 1 - start, total - start)
        return x

    def decode(self, latents: np.ndarray) -> np.ndarray:
        z = latents / np.float32(self.manifest.vae_scaling_factor)
        pixels = self.engines[names.VAE_DECODER](**{names.LATENT_SAMPLE: z})[names.SAMPLE]
        return _finite(pixels.astype(np.float32), "VAE decoder")  # (B, 3, H, W) in [-1, 1]

    # -- modes ------------------------------------------------------------------------------------
    def txt2img(self, prompt: str, negative_prompt: str = "", steps: int = 20, guidance: float = 7.5,
                seed: int | None = None, sampler: str = "euler", height: int | None = None,
                width: int | None = None, batch: int = 1, latents: np.ndarray | None = None,
                progress: Progress | None = None, eta: float | None = None, clip_skip: int = 1,
                emphasis: bool = True, truncate: bool = False, loras=None, watermark: bool | None = None) -> list:
        """Generate `batch` images. Image i is drawn with seed+i. `sampler`: a name from `sdrt info` (sdrt's,
        AUTOMATIC1111's label or the diffusers class); `eta`: DDIM's stochasticity. Prompts take A1111's
        syntax ((word:1.3), [word], BREAK) unless `emphasis` is off, and run past 77 tokens in chunks unless
        `truncate`; `clip_skip` counts as A1111 does. `loras`: [(file, weight)], added to the prompt's
        `<lora:name:weight>` tags. `watermark`: the reference scripts' invisible watermark; None marks every
        image large enough to carry it when the `watermark` extra is installed. Returns PIL images whose
        `info["parameters"]` holds the settings in AUTOMATIC1111's format."""
        text = self._text_options(clip_skip, emphasis, truncate)
        if watermark not in (None, True, False):
            raise InvalidRequest(f"watermark must be True, False or None (automatic), got {watermark!r}")
        if watermark:
            _watermark.require()
        self.set_loras(self._request_loras(request.check_prompt(prompt), loras))
        job = self._job(prompt, negative_prompt, steps, guidance, seed, sampler, height, width, batch, eta, text,
                        _watermark.available() if watermark is None else watermark)
        if self.manifest.unet_in_channels != self.manifest.latent_channels:
            raise InvalidRequest(f"this bundle's U-Net takes {self.manifest.unet_in_channels} input channels, "
                                 f"not {self.manifest.latent_channels}: it is not a text-to-image model")
        if latents is not None:
            latents = request.check_latents(latents, job.latent_shape)
        solver = job.solver
        x = job.noise.standard_normal(job.latent_shape) if latents is None else latents
        x = x * np.float32(solver.init_noise_sigma)  # (B, 4, H/8, W/8)
        x = self._denoise(x, self._guided_text(job), solver, job.guidance, job.noise, progress=progress)
        return self._images(self.decode(x), job, solver, seeded=latents is None)

    def _text_options(self, clip_skip, emphasis, truncate) -> TextOptions:
        for value, what in ((emphasis, "emphasis"), (truncate, "truncate")):
            if not isinstance(value, bool):
                raise InvalidRequest(f"{what} must be True or False, got {value!r}")
        return TextOptions(emphasis, truncate, request.check_int(clip_skip, "clip skip", 1, self.text.layers))

    def _job(self, prompt, negative_prompt, steps, guidance, seed, sampler, height, width, batch, eta,
             text: TextOptions, watermark: bool = False) -> "_Job":
        """Check the options every mode shares; draw a seed when none is given."""
        m = self.manifest
        height = request.check_size(m.default_height if height is None else height, "height", m.vae_scale_factor)
        width = request.check_size(m.default_width if width is None else width, "width", m.vae_scale_factor)
        batch = request.check_int(batch, "batch", 1, request.MAX_BATCH)
        seed = request.check_seed(seed)
        seed = request.draw_seed() if seed is None else seed
        steps = request.check_int(steps, "steps", 1, self.scheduler_config.get("num_train_timesteps", 1000))
        return _Job(
            prompt=request.check_prompt(prompt),
            negative_prompt=request.check_prompt(negative_prompt, "negative prompt"),
            steps=steps, guidance=request.check_guidance(guidance),
            solver=make_sampler(sampler, self.scheduler_config, steps, eta), seed=seed, text=text, watermark=watermark,
            height=height, width=width, batch=batch,
            latent_shape=(batch, m.latent_channels, height // m.vae_scale_factor, width // m.vae_scale_factor),
            noise=request.BatchNoise([seed + i for i in range(batch)]))

    def _guided_text(self, job: "_Job") -> np.ndarray:
        if job.guidance <= 1.0:
            return np.repeat(self.encode_prompt([job.prompt], job.text), job.batch, axis=0)  # (B, 77·k, D)
        uncond, cond = np.split(self.encode_prompt([job.negative_prompt, job.prompt], job.text), 2)
        return np.concatenate([np.repeat(uncond, job.batch, axis=0), np.repeat(cond, job.batch, axis=0)])  # (2B, 77, D)

    def _images(self, decoded: np.ndarray, job: "_Job", solver: Sampler, seeded: bool, **extra) -> list:
        """PIL images with their AUTOMATIC1111 parameters. `seeded`: the initial noise came from the seed."""
        images = to_pil(decoded)
        payload = _watermark.payload_for(self.manifest.text_hidden_size)
        marked = [job.watermark and _watermark.fits(image, payload) for image in images]
        if any(marked):
            images = [_watermark.apply_watermark([im], payload=payload)[0] if m else im
                      for im, m in zip(images, marked)]
        for i, image in enumerate(images):
            settings = {"Steps": job.steps, "Sampler": solver.label, "CFG scale": job.guidance}
            if getattr(solver, "eta", 0):
                settings["Eta DDIM"] = solver.eta  # AUTOMATIC1111's keys
            if job.text.clip_skip > 1:
                settings["Clip skip"] = job.text.clip_skip
            if not job.text.emphasis:
                settings["Emphasis"] = "None"
            if marked[i]:
                settings["Watermark"] = f"dwtDct {payload}"
            if self.loras:
                settings["Lora"] = ", ".join(f"{x.path.stem}: {x.weight:g}" for x in self.loras)
            if seeded:
                settings["Seed"] = job.seed + i
            settings.update({"Size": f"{job.width}x{job.height}", "Model hash": self.manifest.model_hash,
                             "Model": self.path.name, **extra, "Version": f"sdrt {__version__}"})
            image.info["parameters"] = a1111_parameters(job.prompt, job.negative_prompt, settings)
        return images


@dataclass(frozen=True)
class _Job:
    """A request's checked options, shared by every mode."""

    prompt: str
    negative_prompt: str
    steps: int
    guidance: float
    solver: Sampler  # made for this request: multistep samplers keep state
    text: TextOptions
    watermark: bool
    seed: int
    height: int
    width: int
    batch: int
    latent_shape: tuple  # (B, 4, H/8, W/8)
    noise: request.BatchNoise


def _lora_weight(weight, path) -> float:
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not np.isfinite(weight):
        raise InvalidRequest(f"LoRA {str(path)!r} has weight {weight!r}; give a finite number such as 0.8")
    return float(weight)


def _token_embeddings(path: Path, manifest: Manifest) -> np.ndarray:
    """The (vocab, D) lookup table, memory-mapped (hashed with the rest of the bundle at load)."""
    table_path = path / manifest.token_embeddings
    try:
        table = np.load(table_path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise BundleCorrupt(f"{str(table_path)!r} is not a readable numpy array ({e}); re-export the bundle") from None
    if table.ndim != 2 or table.shape[1] != manifest.text_hidden_size:
        raise BundleCorrupt(f"{str(table_path)!r} has shape {table.shape}, expected (vocab, "
                            f"{manifest.text_hidden_size}); re-export the bundle")
    return table


def _finite(x: np.ndarray, stage: str, step: int | None = None) -> np.ndarray:
    if not np.isfinite(x).all():
        raise NonFiniteOutput(stage, step)
    return x


def _check_io(manifest: Manifest, engines: dict[str, Engine]) -> None:
    """The graphs on disk must have the inputs and outputs the manifest promises (names, dtypes, ranks)."""
    for comp, engine in engines.items():
        spec = manifest.graphs[comp]
        for promised, actual in ((spec.inputs, engine.inputs), (spec.outputs, engine.outputs)):
            for t in promised:
                got = actual.get(t.name)
                if got is None or got.dtype != t.dtype or len(got.shape) != len(t.shape):
                    raise BundleCorrupt(f"{comp} graph does not match {names.MANIFEST_FILE}: tensor {t.name!r} "
                                        f"should be {t.dtype} {list(t.shape)}, found {got}; re-export the bundle")
