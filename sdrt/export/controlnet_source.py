"""Load a ControlNet with torch: a diffusers `ControlNetModel` folder, or a single file as model sites distribute
them (`control_v11p_sd15_canny.safetensors`, or its `.pth` with --allow-pickle).

Single files come in the original ControlNet layout (`control_model.input_blocks.*`, `zero_convs.*`,
`input_hint_block.*`, `middle_block_out.*`; some without the `control_model.` prefix) or already in diffusers'
names. The config is read from the weights (the same reading as a single-file U-Net's, single_file_shapes.py);
what they cannot show is the attention head layout, which follows the base family: SD 1.x ControlNets project
with 1x1 convolutions and use 8 heads, SD 2.x ones project linearly with 64-channel heads (`--family sd1|sd2`
overrides). diffusers' converter renames the weights; a weight it would skip or leave empty refuses the export.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import InvalidRequest, NotAModelFolder, SourceError
from ..runtime.fsutil import sha256_file
from .source import PICKLE_SUFFIXES, check_finite, source_hash, weight_format

LDM_PREFIX = "control_model."
FAMILIES = ("sd1", "sd2")


@dataclass
class ControlNetSource:
    name: str  # the folder's or file's name: what PNG parameters call the model
    model: object  # diffusers.ControlNetModel
    hash: str


def is_controlnet(src: Path, allow_pickle: bool = False) -> bool:
    """A ControlNetModel folder, or a single file whose keys are a ControlNet's (not a whole model's). A pickle
    file (.pth) is only looked into with allow_pickle (weights_only); without, the model loader refuses it."""
    src = Path(src).expanduser()
    if src.is_dir():
        config = src / "config.json"
        if not config.is_file() or (src / "model_index.json").is_file():
            return False
        try:
            return json.loads(config.read_text(encoding="utf-8")).get("_class_name") == "ControlNetModel"
        except (OSError, ValueError):
            return False
    if src.is_file() and src.suffix.lower() in (".safetensors", ".sft"):
        from safetensors import safe_open

        try:
            with safe_open(str(src), framework="pt", device="cpu") as f:
                keys = list(f.keys())
        except Exception:  # noqa: BLE001 - not ours to judge: the model loaders say what is wrong with it
            return False
        return _controlnet_keys(keys)
    if src.is_file() and allow_pickle and src.suffix.lower() in PICKLE_SUFFIXES:
        from .single_file import _Checkpoint

        try:
            return _controlnet_keys(_Checkpoint(src, allow_pickle=True).keyset)
        except SourceError:
            return False
    return False


def _controlnet_keys(keys) -> bool:
    return any(k.startswith(LDM_PREFIX + "input_hint_block.") or k.startswith("input_hint_block.")
               or k.startswith("controlnet_cond_embedding.") for k in keys) and \
        not any(k.startswith("model.diffusion_model.") for k in keys)


def load_controlnet(src: Path, allow_pickle: bool = False, family: str | None = None) -> ControlNetSource:
    src = Path(src).expanduser().resolve()
    if family is not None and family not in FAMILIES:
        raise InvalidRequest(f"unknown --family {family!r} for a ControlNet; expected one of {', '.join(FAMILIES)}")
    if src.is_dir():
        if family is not None:
            raise InvalidRequest("--family is for single-file ControlNets; a folder's config.json gives it")
        return _load_folder(src, allow_pickle)
    if not src.is_file():
        raise NotAModelFolder(f"{str(src)!r} does not exist; give a ControlNet folder or file")
    return _load_file(src, allow_pickle, family)


def _load_folder(src: Path, allow_pickle: bool) -> ControlNetSource:
    import torch
    from diffusers import ControlNetModel

    kwargs = {k: v for k, v in weight_format(src, allow_pickle).items() if v is not None}
    try:
        model = ControlNetModel.from_pretrained(src, torch_dtype=torch.float32, **kwargs).eval()
    except Exception as e:  # noqa: BLE001
        raise SourceError(f"could not load the ControlNet in {str(src)!r}: {str(e).splitlines()[0][:300]}") from None
    check_finite("controlnet", model)
    return ControlNetSource(src.name, model, source_hash(src))


def _load_file(path: Path, allow_pickle: bool, family: str | None) -> ControlNetSource:
    import torch
    from accelerate import init_empty_weights
    from diffusers import ControlNetModel
    from diffusers.loaders import single_file_utils as sfu

    from .single_file import _Checkpoint, _strict
    from .single_file_shapes import layout_error, unet_config

    ck = _Checkpoint(path, allow_pickle)
    keys = ck.keyset
    if not _controlnet_keys(keys):
        raise NotAModelFolder(f"{str(path)!r} is not a ControlNet (no input_hint_block.* or "
                              "controlnet_cond_embedding.* weights)")
    if any(k.startswith("controlnet_cond_embedding.") for k in keys):
        raise NotAModelFolder(f"{str(path)!r} holds a ControlNet in diffusers' names: put it in a folder with its "
                              "config.json (as diffusers saves it) and export the folder")
    prefix = LDM_PREFIX if any(k.startswith(LDM_PREFIX) for k in keys) else ""
    if any(k.startswith(prefix + "label_emb.") for k in keys):
        raise NotAModelFolder(f"{str(path)!r} is an SDXL ControlNet (label_emb.*); sdrt's ControlNets are for "
                              "SD 1.x and 2.x")
    proj = next((k for k in sorted(keys) if k.startswith(prefix) and k.endswith(".proj_in.weight")), None)
    if family is None:
        family = "sd2" if proj is not None and len(ck.shape(proj)) == 2 else "sd1"
    try:
        config = unet_config(ck, family, _base_config(ck, prefix), prefix=prefix, controlnet=True)
    except KeyError as e:
        raise layout_error(ck, f"the weight {e.args[0]!r}, which its layout needs, is missing") from None
    part = ck.load((prefix,))
    with init_empty_weights():
        skeleton = ControlNetModel.from_config(config)
    try:
        converted = sfu.convert_controlnet_checkpoint(part, dict(skeleton.config))
    except Exception as e:  # noqa: BLE001
        raise SourceError(f"could not convert the ControlNet {str(path)!r}: {str(e).splitlines()[0][:300]}") from None
    converted = {k: v for k, v in converted.items() if v is not None}
    _strict(ck, "ControlNet", skeleton.state_dict(), converted)
    model = ControlNetModel.from_config(config)
    model.load_state_dict({k: v.to(torch.float32) for k, v in converted.items()}, strict=True)
    check_finite("controlnet", model)
    return ControlNetSource(path.stem, model.eval(), sha256_file(path))


def _base_config(ck, prefix: str) -> dict:
    """What unet_config does not read: the conditioning embedding (input_hint_block: conv_in, then pairs of 3x3
    convolutions, the second of each with stride 2, then the zero conv_out) and the class name."""
    hint = prefix + "input_hint_block."
    convs = sorted({int(k[len(hint):].split(".")[0]) for k in ck.keyset
                    if k.startswith(hint) and k.endswith(".weight")})
    if len(convs) < 3 or convs != list(range(0, 2 * len(convs), 2)):
        raise SourceError(f"{str(ck.path)!r}: its input_hint_block is not the ControlNet conditioning embedding "
                          "(3x3 convolutions at every second index)")
    first = ck.shape(f"{hint}0.weight")  # (C0, conditioning channels, 3, 3)
    channels = [first[0]] + [ck.shape(f"{hint}{i}.weight")[0] for i in convs[2:-1:2]]
    return {"_class_name": "ControlNetModel", "conditioning_channels": first[1],
            "conditioning_embedding_out_channels": channels, "controlnet_conditioning_channel_order": "rgb"}
