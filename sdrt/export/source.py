"""What the exporter loads a model into (`Source`), and the rules every loader keeps: safetensors by default,
pickle only when asked, no NaN or Inf in a weight. The loaders: folder.py (diffusers folders) and
single_file.py (one checkpoint file in the original layout); a model family picks one (export/families).

Pickle files can run code when unpickled, so a source with only .bin/.ckpt/.pt weights is refused unless
`allow_pickle` is set, and even then torch loads them in weights_only mode (no arbitrary objects).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from ..errors import NotAModelFolder, PickleRefused, SourceError
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


def weight_format(folder: Path, allow_pickle: bool) -> dict:
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


def check_finite(name: str, module) -> None:
    import torch

    for key, tensor in module.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise SourceError(f"{name} weight {key!r} contains NaN or Inf; the checkpoint is corrupt")
