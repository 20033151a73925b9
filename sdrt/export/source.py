"""Open a diffusers-format Stable Diffusion folder with torch: safetensors by default, pickle only when asked.
(A single-file checkpoint, model.safetensors in the original layout, is opened by single_file.py.)

Pickle files can run code when unpickled, so a source with only .bin/.ckpt/.pt weights is refused unless
`allow_pickle` is set, and even then torch loads them in weights_only mode (no arbitrary objects).
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from ..errors import InvalidRequest, NotAModelFolder, PickleRefused, SourceError
from ..runtime.fsutil import sha256_file

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")
TORCH_COMPONENTS = ("text_encoder", "unet", "vae")


@dataclass
class Source:
    path: Path
    model_index: dict
    text_encoder: object  # transformers.CLIPTextModel
    unet: object  # diffusers.UNet2DConditionModel
    vae: object  # diffusers.AutoencoderKL
    scheduler_config: dict
    hash: str
    workdir: object = None  # a single-file checkpoint's temporary config folder (tempfile.TemporaryDirectory)
    depth_estimator: object = None  # transformers.DPTForDepthEstimation, when a depth2img folder carries one

    def close(self) -> None:
        """Remove what loading made on disk (a single file's config folder); the modules stay usable."""
        if self.workdir is not None:
            self.workdir.cleanup()


def _check_layout(src: Path) -> dict:
    if not src.is_dir() or not (src / "model_index.json").is_file():
        raise NotAModelFolder(f"{str(src)!r} is not a diffusers model folder (no model_index.json); give the folder "
                              "that holds model_index.json, unet/, vae/, text_encoder/, tokenizer/ and scheduler/")
    try:
        index = json.loads((src / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise NotAModelFolder(f"{str(src / 'model_index.json')!r} is not valid JSON ({e})") from None
    if "text_encoder_2" in index:
        raise NotAModelFolder(f"{str(src)!r} is an SDXL model (it has text_encoder_2); sdrt exports SD 1.x and 2.x")
    missing = [c for c in (*TORCH_COMPONENTS, "tokenizer", "scheduler") if not (src / c).is_dir()]
    if missing:
        raise NotAModelFolder(f"{str(src)!r} lacks the component folder(s) {', '.join(missing)} of a "
                              "Stable Diffusion 1.x/2.x model")
    return index


def _weight_format(folder: Path, allow_pickle: bool) -> dict:
    """from_pretrained arguments for the weights present: safetensors first, pickle only when allowed."""
    files = [p for p in folder.iterdir() if p.is_file()]
    safe = [p for p in files if p.name.endswith(".safetensors")]
    pickled = [p for p in files if p.suffix in PICKLE_SUFFIXES]
    if safe:
        plain = [p for p in safe if len(p.name.split(".")) == 2]
        variant = None if plain else safe[0].name.split(".")[-2]  # e.g. diffusion_pytorch_model.fp16.safetensors
        return {"use_safetensors": True, "variant": variant}
    if pickled:
        if not allow_pickle:
            raise PickleRefused(f"{str(folder)!r} has only pickle weights ({', '.join(p.name for p in pickled)}), which "
                                "can run code when loaded; convert them to safetensors, or pass --allow-pickle to "
                                "load them in torch's weights_only mode")
        return {"use_safetensors": False}
    raise NotAModelFolder(f"{str(folder)!r} holds no weights (.safetensors, or pickle files with --allow-pickle)")


def source_hash(src: Path) -> str:
    """sha256 over every file of the model (path and content), so two copies of a model hash alike."""
    h = hashlib.sha256()
    for f in sorted(p for p in src.rglob("*") if p.is_file() and not p.name.startswith(".")):
        h.update(f"{f.relative_to(src).as_posix()}\0{sha256_file(f)}\n".encode())
    return h.hexdigest()


def _check_finite(name: str, module) -> None:
    import torch

    for key, tensor in module.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise SourceError(f"{name} weight {key!r} contains NaN or Inf; the checkpoint is corrupt")


def load_source(src: Path, allow_pickle: bool = False, family: str | None = None) -> Source:
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    from . import single_file

    src = Path(src).expanduser().resolve()
    if src.is_file() or (not src.exists() and src.suffix.lower() in single_file.SUFFIXES):
        return single_file.load_single_file(src, allow_pickle, family)  # model.safetensors in the original layout
    if family is not None:
        raise InvalidRequest(f"--family is for single-file checkpoints; {str(src)!r} is a folder, whose configs "
                             "give the family")
    index = _check_layout(src)
    formats = {c: _weight_format(src / c, allow_pickle) for c in TORCH_COMPONENTS}
    classes = {"text_encoder": CLIPTextModel, "unet": UNet2DConditionModel, "vae": AutoencoderKL}
    modules = {}
    for name, cls in classes.items():
        kwargs = {k: v for k, v in formats[name].items() if v is not None}
        logging.getLogger("transformers").setLevel(logging.ERROR)
        try:
            modules[name] = cls.from_pretrained(src / name, torch_dtype=torch.float32, **kwargs).eval()
        except Exception as e:  # noqa: BLE001 - loaders raise many kinds; the message is what matters
            detail = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
            raise SourceError(f"could not load {name} from {str(src / name)!r}: {detail}") from None
        _check_finite(name, modules[name])
    sched_file = src / "scheduler" / "scheduler_config.json"
    if not sched_file.is_file():
        raise NotAModelFolder(f"{str(sched_file)!r} is missing")
    return Source(src, index, modules["text_encoder"], modules["unet"], modules["vae"],
                  json.loads(sched_file.read_text(encoding="utf-8")), source_hash(src),
                  depth_estimator=_depth_estimator(src, allow_pickle))


def _depth_estimator(src: Path, allow_pickle: bool):
    """diffusers' depth2img layout: depth_estimator/ (DPTForDepthEstimation) beside the U-Net."""
    folder = src / "depth_estimator"
    if not (folder / "config.json").is_file():
        return None
    from transformers import DPTForDepthEstimation

    kwargs = {k: v for k, v in _weight_format(folder, allow_pickle).items() if v is not None}
    try:
        model = DPTForDepthEstimation.from_pretrained(folder, **kwargs).eval()
    except Exception as e:  # noqa: BLE001
        raise SourceError(f"could not load depth_estimator from {str(folder)!r}: {str(e).splitlines()[0][:300]}") from None
    _check_finite("depth_estimator", model)
    return model
