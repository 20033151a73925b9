"""A request's ControlNets, step by step: which act at step i, their residuals, scaled and summed.

As diffusers' StableDiffusionControlNetPipeline (and MultiControlNetModel) computes them:
- the control image: RGB, resized to the generation size (Lanczos), in [0, 1], repeated per image of the batch
  and, with classifier-free guidance, for the negative rows too ([negative; positive], like the text);
- net k acts at step i of n (counted from the first step run, as img2img's shortened schedule) unless
  i/n < start_k or (i+1)/n > end_k; diffusers then runs it at scale 0, this skips it, and a step where no net acts
  runs the plain U-Net (the same numbers: the residual U-Net adds zeros);
- residual r of net k is scaled by weight_k, or in guess mode by weight_k * logspace(-1, 0, R)[r] (0.1 for the
  first down residual up to 1 for the mid one); guess mode with guidance runs the nets on the positive rows only
  and gives the negative rows no control;
- several nets sum their residuals.

A1111's control modes (sd-webui-controlnet's hook.py), per net: "Balanced" is the above; "My prompt is more
important" scales residual r of R by weight * 0.825^(R-1-r) instead (its "soft injection": 0.825^12 = 0.099 for
the first of SD's 13, 1 for the mid one); "ControlNet is more important" does that too and gives the negative
rows no control (its "cfg injection"; the net then runs on the positive rows only: the same numbers, half the work).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from PIL import Image

from ..errors import InvalidRequest
from . import images as im
from . import names
from .controlnet import Control, ControlNet
from .engines.base import Engine
from .manifest import residual_shapes
from .preprocess import PREPROCESSORS, run_preprocessor


CONTROL_MODES = ("Balanced", "My prompt is more important", "ControlNet is more important")  # A1111's, 0, 1, 2
SOFT = 0.825  # A1111's soft-injection ratio between neighbouring residuals


def control_mode(value) -> str:
    """A1111's label, its index (0, 1, 2, as its API takes them) or balanced / prompt / controlnet."""
    short = {"balanced": 0, "prompt": 1, "controlnet": 2}
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(CONTROL_MODES):
        return CONTROL_MODES[value]
    if isinstance(value, str) and (value in CONTROL_MODES or value.lower() in short):
        return value if value in CONTROL_MODES else CONTROL_MODES[short[value.lower()]]
    raise InvalidRequest(f"control mode {value!r} is not one of {', '.join(map(repr, CONTROL_MODES))} (or 0, 1, 2; "
                         "balanced, prompt, controlnet)")


def check_controls(controls, guess_mode) -> tuple[Control, ...]:
    """The request's controls, each checked (the image is read later, at the generation size)."""
    if not isinstance(guess_mode, bool):
        raise InvalidRequest(f"guess_mode must be True or False, got {guess_mode!r}")
    if controls is None:
        return ()
    if isinstance(controls, Control):
        controls = [controls]
    out = []
    for k, c in enumerate(controls):
        if not isinstance(c, Control) or not isinstance(c.net, ControlNet):
            raise InvalidRequest(f"controls[{k}] is {c!r}; give sdrt.Control(sdrt.ControlNet.load(CN_BUNDLE), image)")
        for value, what, lo, hi in ((c.weight, "weight", 0.0, 10.0), (c.start, "start", 0.0, 1.0),
                                    (c.end, "end", 0.0, 1.0)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
                raise InvalidRequest(f"ControlNet {c.net.name!r}: {what} must be a number from {lo:g} to {hi:g}, "
                                     f"got {value!r}")
        if c.start >= c.end:
            raise InvalidRequest(f"ControlNet {c.net.name!r}: start {c.start:g} must be below end {c.end:g}")
        if c.preprocess not in (None, *PREPROCESSORS):
            raise InvalidRequest(f"ControlNet preprocessor {c.preprocess!r} is not one of none, "
                                 f"{', '.join(PREPROCESSORS)}; for any other (pose, segmentation, ...) give the "
                                 "preprocessed image")
        out.append(replace(c, mode=control_mode(c.mode)))
    return tuple(out)


def control_image(control: Control, width: int, height: int, depth=None) -> np.ndarray:
    """(1, 3, H, W) float32 in [0, 1]: diffusers' control image processor (convert to RGB, Lanczos resize, /255),
    after the preprocessor if one is named (at the generation size). depth: the bundle's depth map maker."""
    image = im.load_image(control.image, "control image").convert("RGB").resize((width, height), Image.LANCZOS)
    if control.preprocess is not None:
        image = run_preprocessor(control.preprocess, image, control.canny_low, control.canny_high, depth)
    x = np.asarray(image, dtype=np.float32) / 255.0  # (H, W, 3)
    if control.net.manifest.bgr:
        x = x[..., ::-1]
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


def size_from(controls, options: dict) -> dict:
    """txt2img without height/width takes the first control image's size (rounded down to a multiple of 8), as
    diffusers' ControlNet pipeline does."""
    controls = [controls] if isinstance(controls, Control) else controls
    if not controls or options.get("height") or options.get("width") or not isinstance(controls[0], Control):
        return options  # (check_controls refuses what is not a Control)
    w, h = im.load_image(controls[0].image, "control image").size
    f = controls[0].net.manifest.image_scale
    return {**options, "width": max(f, w // f * f), "height": max(f, h // f * f)}


@dataclass
class Guide:
    """The controls of one job, their images prepared: `residuals(...)` at each step."""

    controls: tuple[Control, ...]
    images: list[np.ndarray]  # per control: (B, 3, H, W), or (2B, ...) with guidance outside guess mode
    guess_mode: bool

    @classmethod
    def make(cls, controls, guess_mode: bool, width: int, height: int, batch: int, cfg: bool,
             depth=None) -> "Guide | None":
        if not controls:
            return None
        guess = guess_mode or any(c.net.manifest.global_pool_conditions for c in controls)
        images = [np.repeat(control_image(c, width, height, depth), 2 * batch if cfg and not cls._cond_only(c, guess)
                            else batch, axis=0) for c in controls]
        return cls(controls, images, guess)

    @staticmethod
    def _cond_only(control: Control, guess: bool) -> bool:
        """Whether the net gives only the positive rows control (guess mode, A1111's cfg injection)."""
        return guess or control.mode == CONTROL_MODES[2]

    def residuals(self, i: int, n: int, x: np.ndarray, t: np.ndarray, text: np.ndarray, cfg: bool) -> dict | None:
        """Summed residuals for step i of n (None: no net acts). x: (B, 4, h, w) scaled latents; t: (rows,)
        timesteps; text: encoder_hidden_states (rows, 77·k, D), rows = 2B with guidance ([negative; positive])."""
        active = [(c, img) for c, img in zip(self.controls, self.images) if not (i / n < c.start or (i + 1) / n > c.end)]
        if not active:
            return None
        b, total = len(x), None
        for control, image in active:
            cond_only = cfg and self._cond_only(control, self.guess_mode)
            if cond_only:  # the positive rows; the negative ones get zeros
                out = control.net(x, t[b:], text[b:], image)
            else:
                out = control.net(np.concatenate([x, x]) if cfg else x, t, text, image)
            scales = self._scales(control, len(out))
            scaled = {k: v * s for (k, v), s in zip(out.items(), scales)}
            if cond_only:
                scaled = {k: np.concatenate([np.zeros_like(v), v]) for k, v in scaled.items()}
            total = scaled if total is None else {k: total[k] + v for k, v in scaled.items()}
        return total

    def _scales(self, control: Control, count: int) -> list[np.float32]:
        w = np.float32(control.weight)
        if self.guess_mode and not control.net.manifest.global_pool_conditions:
            ramp = np.logspace(-1, 0, count).astype(np.float32)  # torch.logspace(-1, 0, 13) in float32
            return [np.float32(r * w) for r in ramp]
        if control.mode != CONTROL_MODES[0]:  # A1111's soft injection
            return [np.float32(control.weight * SOFT ** float(count - 1 - r)) for r in range(count)]
        return [w] * count


class PlainThroughResiduals(Engine):
    """The plain U-Net as the residual U-Net computes it with zero residuals (x + 0 is x: the same numbers, tested
    bit for bit), so that a pipeline which opened the residual U-Net for a ControlNet keeps one copy of the U-Net's
    weights in memory, not two (3.4 GB each at SD 1.5's size on ONNX Runtime)."""

    def __init__(self, plain, manifest):
        """plain: the U-Net engine this stands in for (its names and shapes; Pipeline.set_loras reopens the plain
        graph from its path and threads); `controlled`, the residual U-Net, is set by the pipeline."""
        self.name, self.inputs, self.outputs = plain.name, plain.inputs, plain.outputs
        self.path, self.threads = plain.path, plain.threads
        self.controlled, self._residuals, self._zeros = None, manifest.residuals, {}

    def __getattr__(self, name):
        """Anything else (native_ops, the session, ...) is the engine's that computes: the residual U-Net."""
        controlled = self.__dict__.get("controlled")
        if controlled is None:
            raise AttributeError(name)
        return getattr(controlled, name)

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        b, _, h, w = feeds[names.SAMPLE].shape
        if (b, h, w) not in self._zeros:  # one shape kept: a request's steps share it
            self._zeros = {(b, h, w): {n: np.zeros(s, np.float32)
                                       for n, s in residual_shapes(self._residuals, b, h, w).items()}}
        return self.controlled(**feeds, **self._zeros[(b, h, w)])


def infotext(controls, guess_mode: bool) -> dict[str, str]:
    """PNG parameters for each ControlNet, in the A1111 extension's `ControlNet i: "..."` form."""
    out = {}
    for k, c in enumerate(controls):
        fields = {"Module": c.preprocess or "none", "Model": f"{c.net.name} [{c.net.manifest.short_hash}]",
                  "Weight": f"{c.weight:g}", "Resize Mode": "Just Resize"}
        if c.preprocess == "canny":
            fields |= {"Threshold A": c.canny_low, "Threshold B": c.canny_high}
        fields |= {"Guidance Start": f"{c.start:g}", "Guidance End": f"{c.end:g}",
                   "Control Mode": "Guess Mode" if guess_mode else c.mode}
        out[f"ControlNet {k}"] = '"' + ", ".join(f"{key}: {v}" for key, v in fields.items()) + '"'
    return out


def residual_unet_missing(bundle_name: str) -> InvalidRequest:
    return InvalidRequest(f"bundle {bundle_name!r} has no U-Net that takes ControlNet residuals ({names.UNET}/"
                          f"{names.CONTROLNET_MODEL_FILE}); add it with `sdrt controlnet prepare BUNDLE`, or export "
                          "the model again with this sdrt")
