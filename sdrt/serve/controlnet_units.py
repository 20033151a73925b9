"""The ControlNet extension's API (Mikubill/sd-webui-controlnet: `alwayson_scripts.controlnet.args`, one unit per
net, and its /controlnet/model_list and /module_list routes) onto sdrt's ControlNets (runtime/controlnet.py).

A unit's model is one of the ControlNet bundles the server was started with (`sdrt serve --controlnet CN`), looked
up by title, name or hash. Its module: none, canny (threshold_a/threshold_b are the low/high thresholds), invert
or depth (the model bundle's estimator). Units with `enabled: false` or model "None" are skipped, as the extension
does. sdrt resizes the control image to the generation size as diffusers does: `resize_mode`, `processor_res` and
`pixel_perfect` are accepted and not used.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import InvalidRequest
from ..runtime.controls import control_mode
from ..runtime.preprocess import PREPROCESSORS
from . import a1111
from .models import lookup

TITLE = "controlnet"  # A1111 matches alwayson script titles case-insensitively
MODULES = ("none", *PREPROCESSORS)
_MODULE_ALIASES = {"invert (from white bg & black line)": "invert"}


@dataclass(frozen=True)
class Unit:
    """One checked unit; the worker makes it a runtime Control with its own copy of the net."""

    net: str  # a served ControlNet's name (models.served_nets)
    image: object  # PIL image
    weight: float
    start: float
    end: float
    preprocess: str | None
    canny_low: int
    canny_high: int
    mode: str


def units(scripts: dict, nets: list, init_image=None) -> list[Unit]:
    """alwayson_scripts -> the enabled units; other script titles are the caller's to refuse."""
    args = next((v for k, v in (scripts or {}).items() if k.lower() == TITLE), None)
    if args is None:
        return []
    if isinstance(args, dict):
        args = args.get("args", [])
    if not isinstance(args, list):
        raise InvalidRequest(f"alwayson_scripts.controlnet.args must be a list of units, got {type(args).__name__}")
    out = []
    for i, unit in enumerate(args):
        if not isinstance(unit, dict):
            raise InvalidRequest(f"ControlNet unit {i} must be an object with image, module, model, ..., got "
                                 f"{type(unit).__name__}")
        if not unit.get("enabled", True) or str(unit.get("model", "None")) in ("None", "none", ""):
            continue
        out.append(_unit(i, unit, nets, init_image))
    return out


def _unit(i: int, unit: dict, nets, init_image) -> Unit:
    net = lookup(nets, unit["model"], "ControlNet model", "sdrt serve --controlnet CN_BUNDLE adds one")
    image = unit.get("image") or unit.get("input_image")
    if isinstance(image, dict):  # the extension also takes {"image": b64, "mask": b64}
        image = image.get("image")
    if image:
        image = a1111.decode_image(image, f"ControlNet unit {i} image")
    elif init_image is not None:
        image = init_image  # img2img without a control image: the extension uses the init image
    else:
        raise InvalidRequest(f"ControlNet unit {i} ({net.title}) has no image; send its control image base64-encoded")
    module = str(unit.get("module", "none")).lower()
    module = _MODULE_ALIASES.get(module, module)
    if module not in MODULES:
        raise InvalidRequest(f"ControlNet unit {i} module {unit.get('module')!r} is not one of {', '.join(MODULES)}; "
                             "for another preprocessor send its output as the image with module none")
    low, high = (_number(unit, "threshold_a", 100), _number(unit, "threshold_b", 200)) if module == "canny" else (100, 200)
    return Unit(net.name, image, _number(unit, "weight", 1.0), _number(unit, "guidance_start", 0.0),
                _number(unit, "guidance_end", 1.0), None if module == "none" else module, int(low), int(high),
                control_mode(unit.get("control_mode", 0)))


def _number(unit: dict, key: str, default: float) -> float:
    value = unit.get(key, default)
    value = default if value is None else value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidRequest(f"ControlNet unit {key} must be a number, got {value!r}")
    return value


def controls(units_: list[Unit], opened: dict) -> list:
    """Runtime Controls over a worker's opened nets (name -> ControlNet)."""
    from ..runtime.controlnet import Control

    return [Control(opened[u.net], u.image, u.weight, u.start, u.end, u.preprocess, u.canny_low, u.canny_high,
                    u.mode) for u in units_]
