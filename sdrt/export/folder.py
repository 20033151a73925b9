"""Open a diffusers-format Stable Diffusion folder with torch (safetensors by default, see source.py)."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from ..errors import NotAModelFolder, SourceError
from .source import TORCH_COMPONENTS, Source, check_finite, source_hash, weight_format


def check_layout(src: Path) -> dict:
    from .controlnet_source import is_controlnet

    if is_controlnet(src):
        raise NotAModelFolder(f"{str(src)!r} is a ControlNet, not a model: export it with `sdrt export` (the CLI "
                              "tells them apart) or sdrt.export.export_controlnet, and pass it with --controlnet")
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


def load_folder(src: Path, allow_pickle: bool = False) -> Source:
    """A diffusers StableDiffusionPipeline folder (SD 1.x/2.x; a depth2img one with its depth estimator)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    index = check_layout(src)
    formats = {c: weight_format(src / c, allow_pickle) for c in TORCH_COMPONENTS}
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
        check_finite(name, modules[name])
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

    kwargs = {k: v for k, v in weight_format(folder, allow_pickle).items() if v is not None}
    try:
        model = DPTForDepthEstimation.from_pretrained(folder, **kwargs).eval()
    except Exception as e:  # noqa: BLE001
        raise SourceError(f"could not load depth_estimator from {str(folder)!r}: {str(e).splitlines()[0][:300]}") from None
    check_finite("depth_estimator", model)
    return model
