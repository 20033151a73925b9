"""The Stable Diffusion pipeline over a bundle: tokenize, encode, denoise, decode. Pure numpy around the engines.

The denoise loop (Rombach et al. 2022, with classifier-free guidance, Ho & Salimans 2022) is `_denoise`;
everything else prepares its inputs or checks its outputs.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np

from .. import __version__, embedded
from ..errors import BundleNotFound, EngineNotBuilt, InvalidRequest, NonFiniteOutput
from . import controls as _controls
from . import hypernetworks, lora, names, request
from . import watermark as _watermark
from .embeddings import load_embedding
from .engines import BACKENDS, Engine, OrtEngine, check_io, open_engines, open_onnx
from .images import a1111_parameters, to_pil
from .lora import Lora
from .manifest import Manifest, load_manifest, read_json
from .modes import ImageModes
from .samplers import Sampler, SchedulerConfig, make_sampler
from .text import TextEncoder, TextOptions

Progress = Callable[[int, int], None]


class Pipeline(ImageModes):
    def __init__(self, path: Path, manifest: Manifest, engines: dict[str, Engine], text: TextEncoder,
                 scheduler_config: dict, threads: int | None = None):
        self.path, self.manifest, self.engines, self.threads = path, manifest, engines, threads
        self.family = manifest.model_family  # what the U-Net takes besides latents and timestep
        self.backend, self.trt_session, self.int8 = "onnxruntime", None, False
        self.text, self.tokenizer, self.scheduler_config = text, text.tokenizer, scheduler_config
        self.loras: tuple[Lora, ...] = ()  # applied to the U-Net and text encoder engines now
        self.lora_dirs: list[Path] = []  # where <lora:name:w> prompt tags are looked up
        self._patched: set[str] = set()  # components whose engines run on patched weights
        self._unet_patches: dict | None = None  # the U-Net's LoRA patches: its hypernetwork variants take them too
        self._variant: tuple[str, Engine] | None = None  # the hypernetwork U-Net opened last (one at a time)
        self._controlled: Engine | None = None  # the U-Net that takes ControlNet residuals, opened at first use

    @classmethod
    def load(cls, path: str | Path | None = None, backend: str = "auto", threads: int | None = None,
             engines: str | Path | None = None, int8: bool = False) -> "Pipeline":
        """Validate the bundle's manifest and hashes, then open its graphs. backend: "onnxruntime" (the CPU),
        "tensorrt" (the engines `sdrt build` made for this GPU, in `engines`, default ./engines) or "auto"
        (TensorRT when engines for this GPU exist there, else ONNX Runtime). Without a path: the embedded
        demo model (sdrt/embedded). int8: the U-Net with int8 MatMuls (ONNX Runtime only; a bundle exported
        with `sdrt export --int8`; no LoRA)."""
        if backend not in BACKENDS:
            raise InvalidRequest(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")
        if path is None and not (embedded.BUNDLE / names.MANIFEST_FILE).is_file():
            raise BundleNotFound(f"the embedded demo model is missing from this install ({embedded.BUNDLE}); "
                                 "reinstall sdrt, or name a bundle: "
                                 "`sdrt export SRC --out BUNDLE`, then --model BUNDLE / Pipeline.load(BUNDLE)")
        path = Path(embedded.BUNDLE if path is None else path).expanduser()
        manifest = load_manifest(path)
        opened = open_engines(path, manifest, backend, engines, threads, int8)
        text = manifest.model_family.open_text(path, manifest, opened.engines)  # tokenizer, lookup table
        sched_file = path / "scheduler" / "scheduler_config.json"
        sched = read_json(sched_file) if sched_file.exists() else {}
        sched["prediction_type"] = manifest.prediction_type
        SchedulerConfig.from_dict(sched)  # refuse an unusable config at load, not at the first request
        pipe = cls(path, manifest, opened.engines, text, sched, threads)
        pipe.backend, pipe.trt_session = opened.backend, opened.session  # the session owns the device memory
        pipe.int8 = int8
        return pipe

    def _open(self, component: str, rel: str) -> Engine:
        return open_onnx(self.path, self.manifest, component, rel, self.threads)

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
        if loras and self.int8:
            raise InvalidRequest("LoRA can't patch the int8 U-Net (its weights are int8 copies); load the "
                                 "pipeline without int8 to use LoRA")
        if loras and self.backend == "tensorrt":
            raise InvalidRequest("LoRA needs the ONNX Runtime backend: TensorRT engines have their weights built "
                                 "in; load the pipeline with backend='onnxruntime'")
        wanted = tuple(_lora_item(item) for item in loras)
        if wanted == self.loras:
            return
        patches = lora.overrides(self.path, list(wanted))
        unet_changes = names.UNET in patches or names.UNET in self._patched
        for comp in names.LORA_COMPONENTS:
            if comp in patches or comp in self._patched:
                old = self.engines[comp]  # (the plain U-Net, or its stand-in PlainThroughResiduals: path, threads)
                self.engines[comp] = OrtEngine(old.path, comp, old.threads, patches.get(comp))
        self._patched = set(patches)
        self.loras = wanted
        self._unet_patches, self._variant = patches.get(names.UNET), None  # variants reopen on the new weights
        if unet_changes:
            self._controlled = None

    def _request_loras(self, prompt: str, loras) -> list[tuple[Path, float]]:
        """--lora files plus the prompt's <lora:name:w> tags, resolved in lora_dirs."""
        _, tags = lora.parse_tags(prompt)
        return [*(loras or []), *((lora.resolve(name, self.lora_dirs), w) for name, w in tags)]

    # -- the three stages -------------------------------------------------------------------------
    def encode_prompt(self, prompts: list[str], options: TextOptions = TextOptions()) -> np.ndarray:
        """(N, 77·k, D): prompts in A1111's syntax, each padded to the longest one's k chunks."""
        return _finite(self.text.encode(prompts, options), "text encoder")

    def _denoise(self, x: np.ndarray, cond: dict[str, np.ndarray], job: "_Job", start: int = 0,
                 progress: Progress | None = None, extra: np.ndarray | None = None, blend=None) -> np.ndarray:
        """The loop. x: (B, 4, h, w) noised latents; cond: the model family's conditioning inputs of the U-Net,
        rows [uncond; cond] with guidance (SD: encoder_hidden_states (2B, 77·k, D)), passed through unread.
        extra: (B, C', h, w) channels the U-Net takes after the latents (inpainting models: mask and
        masked-image latents; depth2img: depth). blend(x, i): what to keep after step i (inpainting with an
        ordinary model puts the known region back). job.stop(): checked after each step; True returns the
        latents as they are then (an interrupted request decodes them, as AUTOMATIC1111 does)."""
        sampler, noise = job.solver, job.noise
        cfg = job.guidance > 1.0  # diffusers' convention: scales <= 1 run the conditional branch alone
        guidance = np.float32(job.guidance) if job.row_guidance is None else job.row_guidance  # () or (B, 1, 1, 1)
        (unet, strength), total = self._unet(job), len(sampler.timesteps)
        scalar_t = len(unet.inputs[names.TIMESTEP].shape) == 0  # optimum's graphs take one scalar timestep
        for i in range(start, total):
            x_in = latents_in = sampler.scale_model_input(x, i)  # (B, 4, h, w): what ControlNets see
            if extra is not None:
                x_in = np.concatenate([x_in, extra], axis=1)  # (B, 4 + C', h, w)
            x_in = np.concatenate([x_in, x_in]) if cfg else x_in
            t_rows = np.full(len(x_in), sampler.timesteps[i], np.float32)
            t = np.float32(sampler.timesteps[i]) if scalar_t else t_rows
            residuals = job.guide and job.guide.residuals(  # None where no ControlNet acts
                i - start, total - start, latents_in, t_rows, cond[names.ENCODER_HIDDEN_STATES], cfg)
            net = self._controlled_unet() if residuals else unet
            eps = net(**{names.SAMPLE: x_in, names.TIMESTEP: t, **cond, **strength, **(residuals or {})})[names.OUT_SAMPLE]
            eps = _finite(np.asarray(eps, np.float32), "U-Net", step=i)  # no copy when already fp32
            if cfg:
                eps_uncond, eps_cond = eps[: len(x)], eps[len(x):]  # views: np.split costs 4x more per step
                eps = eps_uncond + guidance * (eps_cond - eps_uncond)
            x = sampler.step(eps, i, x, noise)
            if blend is not None:
                x = blend(x, i)
            if progress:
                progress(i + 1 - start, total - start)
            if job.stop is not None and job.stop():
                break
        return x

    def _unet(self, job: "_Job") -> tuple[Engine, dict[str, np.ndarray]]:
        """The U-Net for the job, and the inputs it takes besides the plain one's: a hypernetwork's variant
        and its strength, or the plain U-Net (no hypernetwork, or strength 0: the same image exactly)."""
        hn = job.hypernetwork
        if job.guide is not None:
            self._controlled_unet()  # first: on ONNX Runtime it then serves the plain steps too (one weight copy)
        if hn is None or hn.off:
            return self.engines[names.UNET], {}
        if self._variant is None or self._variant[0] != hn.component:
            self._variant = None  # one variant open at a time: each session holds the U-Net's weights
            self._variant = (hn.component, self._open_variant(hn))
        return self._variant[1], hn.feeds()

    def _controlled_unet(self) -> Engine:
        """The U-Net that takes ControlNet residuals (unet/model.controlnet*.onnx), on the U-Net's LoRA weights."""
        if self._controlled is None and self.backend == "tensorrt":
            if names.UNET_CONTROLNET not in self.engines:
                raise EngineNotBuilt(f"no TensorRT engine for the ControlNet U-Net on this GPU: run `sdrt build "
                                     f"{self.path} --controlnet CN_BUNDLE`, or load the pipeline with "
                                     "backend='onnxruntime'")
            self._controlled = self.engines[names.UNET_CONTROLNET]
        if self._controlled is None:
            rel = self.manifest.cpu_graphs.get(names.UNET_CONTROLNET, self.manifest.graphs[names.UNET_CONTROLNET].path)
            plain = _controls.PlainThroughResiduals(self.engines.pop(names.UNET), self.manifest)  # the plain session
            try:  # is closed first: the two would hold the U-Net's weights twice
                engine = OrtEngine(self.path / rel, names.UNET_CONTROLNET, self.threads, self._unet_patches)
                check_io(self.manifest, {names.UNET_CONTROLNET: engine})
            except BaseException:
                self.engines[names.UNET] = OrtEngine(plain.path, names.UNET, plain.threads, self._unet_patches)
                raise
            self._controlled = plain.controlled = engine
            self.engines[names.UNET] = plain
        return self._controlled

    def _open_variant(self, hn: hypernetworks.Choice) -> Engine:
        if self.int8:
            raise InvalidRequest("hypernetworks run in the fp32 U-Net, not the int8 one; load the pipeline "
                                 "without int8 to use them")
        if self.backend == "tensorrt":
            engine = self.engines.get(hn.component)
            if engine is None:
                raise EngineNotBuilt(f"no TensorRT engine for hypernetwork {hn.name!r} on this GPU: run "
                                     f"`sdrt build {self.path} --hypernetwork {hn.name}`, or load the pipeline "
                                     "with backend='onnxruntime'")
            return engine
        rel = self.manifest.cpu_graphs.get(hn.component, self.manifest.graphs[hn.component].path)
        engine = OrtEngine(self.path / rel, hn.component, self.threads, self._unet_patches,
                           data_dir=self.path / names.data_dir(rel))
        check_io(self.manifest, {hn.component: engine})
        return engine

    def decode(self, latents: np.ndarray) -> np.ndarray:
        z = latents / np.float32(self.manifest.vae_scaling_factor)
        pixels = self.engines[names.VAE_DECODER](**{names.LATENT_SAMPLE: z})[names.SAMPLE]
        return _finite(pixels.astype(np.float32), "VAE decoder")  # (B, 3, H, W) in [-1, 1]

    # -- modes ------------------------------------------------------------------------------------
    def txt2img(self, prompt: str, *, latents: np.ndarray | None = None, progress: Progress | None = None,
                **options) -> list:
        """Generate images from a prompt. `latents`: the initial noise (B, 4, H/8, W/8), standard normal,
        instead of the seed's. Options (every mode takes them):

        negative_prompt="", steps=20, guidance=7.5 (<= 1 turns classifier-free guidance off), seed=None
        (random; image i of a batch uses seed+i), sampler="euler" (sdrt's name, AUTOMATIC1111's label or the
        diffusers class), eta=None (DDIM), height/width (the bundle's default size), batch=1, clip_skip=1
        (A1111's numbering), emphasis=True (A1111's (word:1.3) syntax), truncate=False (diffusers' 77-token
        cut instead of 75-token chunks), loras=[(file, weight)] (added to <lora:name:w> tags),
        hypernetwork="name" / "name:0.8" / ("name", 0.8) (one of the bundle's, as a <hypernet:name:0.8> tag does),
        watermark=None (the reference scripts' invisible watermark when its extra is installed), stop=None (a
        function asked after each step; True ends denoising there and the images are decoded as they are).

        controls=[sdrt.Control(sdrt.ControlNet.load(CN_BUNDLE), image, weight=1.0, start=0.0, end=1.0)] (several
        sum their residuals; without height/width txt2img takes the first control image's size), guess_mode=False
        (diffusers': the nets see the positive prompt only, their residuals ramped 0.1 -> 1).

        Returns PIL images whose `info["parameters"]` holds the settings in AUTOMATIC1111's format."""
        job = self._job(prompt, **_controls.size_from(options.get("controls"), options))
        self._require_unet(self.manifest.latent_channels, "text-to-image")
        if latents is not None:
            latents = request.check_latents(latents, job.latent_shape)
        x = job.noise.standard_normal(job.latent_shape) if latents is None else latents
        x = x * np.float32(job.solver.init_noise_sigma)  # (B, 4, H/8, W/8)
        x = self._denoise(x, self._conditioning(job), job, progress=progress)
        return self._images(self.decode(x), job, seeded=latents is None)

    def _require_unet(self, channels: int, mode: str) -> None:
        have = self.manifest.unet_in_channels
        if have != channels:
            kinds = {4: "a text-to-image", 9: "an inpainting", 5: "a depth-guided (depth2img)"}
            raise InvalidRequest(f"{mode} needs a U-Net with {channels} input channels; this bundle's has {have} "
                                 f"({kinds.get(have, 'another kind of')} model): use a bundle exported from such a model")

    def _job(self, prompt, negative_prompt="", steps=20, guidance=7.5, seed=None, sampler="euler", height=None,
             width=None, batch=1, eta=None, clip_skip=1, emphasis=True, truncate=False, loras=None,
             watermark=None, hypernetwork=None, controls=None, guess_mode=False, stop=None) -> "_Job":
        """Check the options every mode shares, apply the request's LoRAs, draw a seed when none is given."""
        prompt = request.check_prompt(prompt)
        prompt = hypernetworks.add_option(prompt, hypernetwork)  # as its tag: the PNG records it
        m = self.manifest
        text = self._text_options(clip_skip, emphasis, truncate)
        if watermark not in (None, True, False):
            raise InvalidRequest(f"watermark must be True, False or None (automatic), got {watermark!r}")
        if watermark:
            _watermark.require()
        height = request.check_size(m.default_height if height is None else height, "height", m.vae_scale_factor)
        width = request.check_size(m.default_width if width is None else width, "width", m.vae_scale_factor)
        batch = request.check_int(batch, "batch", 1, request.MAX_BATCH)
        seed = request.check_seed(seed)
        seed = request.draw_seed() if seed is None else seed
        steps = request.check_int(steps, "steps", 1, self.scheduler_config.get("num_train_timesteps", 1000))
        job = _Job(
            prompt=prompt, hypernetwork=hypernetworks.choose(m, prompt),
            negative_prompt=request.check_prompt(negative_prompt, "negative prompt"),
            steps=steps, guidance=request.check_guidance(guidance),
            solver=make_sampler(sampler, self.scheduler_config, steps, eta), seed=seed, text=text,
            watermark=_watermark.available() if watermark is None else watermark,
            height=height, width=width, batch=batch,
            latent_shape=(batch, m.latent_channels, height // m.vae_scale_factor, width // m.vae_scale_factor),
            noise=request.BatchNoise([seed + i for i in range(batch)]), stop=_check_stop(stop))
        self.set_loras(self._request_loras(job.prompt, loras))
        controls = self._check_controls(_controls.check_controls(controls, guess_mode), job)
        guide = _controls.Guide.make(controls, guess_mode, width, height, batch, job.guidance > 1.0, self._depth_map)
        return replace(job, guide=guide) if guide else job

    def _check_controls(self, controls, job: "_Job") -> tuple:
        if not controls:
            return controls
        if self.int8 or (job.hypernetwork is not None and not job.hypernetwork.off):
            what = "the int8 U-Net" if self.int8 else "a hypernetwork"
            raise InvalidRequest(f"ControlNet does not combine with {what} yet (that U-Net takes no residuals): "
                                 "drop one of the two")
        if names.UNET_CONTROLNET not in self.manifest.graphs:
            raise _controls.residual_unet_missing(self.path.name)
        for c in controls:
            c.net.check_fits(self.manifest, self.path.name)
        return controls

    def _text_options(self, clip_skip, emphasis, truncate) -> TextOptions:
        for value, what in ((emphasis, "emphasis"), (truncate, "truncate")):
            if not isinstance(value, bool):
                raise InvalidRequest(f"{what} must be True or False, got {value!r}")
        return TextOptions(emphasis, truncate, request.check_int(clip_skip, "clip skip", 1, self.text.layers))

    def _conditioning(self, job: "_Job") -> dict[str, np.ndarray]:
        """The prompts as the U-Net's conditioning inputs, as the model family makes them (runtime/families)."""
        return self.family.conditioning(self, job)

    def _images(self, decoded, job: "_Job", seeded: bool = True, paste=None, **extra) -> list:
        """PIL images with their AUTOMATIC1111 parameters. `seeded`: the initial noise came from the seed.
        `paste(images) -> images` puts kept pixels back (inpainting) before the watermark goes on."""
        solver = job.solver
        images = to_pil(decoded)
        if paste is not None:
            images = paste(images)
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
            if job.guide:
                settings.update(_controls.infotext(job.guide.controls, job.guide.guess_mode))
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
    hypernetwork: hypernetworks.Choice | None = None
    guide: _controls.Guide | None = None  # the request's ControlNets
    row_guidance: np.ndarray | None = None  # (B, 1, 1, 1): requests batched together keep their own scales
    stop: Callable[[], bool] | None = None  # asked after each step: True ends the loop there (an interrupt)


def _lora_item(item) -> Lora:
    """A file (weight 1) or (file, weight)."""
    path, weight = (item, 1.0) if isinstance(item, (str, Path)) else (tuple(item) + (None,))[:2]
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not np.isfinite(weight):
        raise InvalidRequest(f"LoRA {str(path)!r} has weight {weight!r}; give a finite number such as 0.8")
    return Lora(Path(path).expanduser(), float(weight))


def _check_stop(stop):
    if stop is not None and not callable(stop):
        raise InvalidRequest(f"stop must be a function taking no arguments (asked after each step), got {stop!r}")
    return stop


def _finite(x: np.ndarray, stage: str, step: int | None = None) -> np.ndarray:
    if not np.isfinite(x).all():
        raise NonFiniteOutput(stage, step)
    return x
