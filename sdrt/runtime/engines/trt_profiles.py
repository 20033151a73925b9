"""Which TensorRT engines a bundle needs, and the one static shape each is built for. Pure Python: no GPU.

TensorRT is fastest with static shapes, and a CUDA graph needs fixed buffers anyway, so every engine has one
optimization profile with min = opt = max. One engine per (component, image size, batch, token count,
precision), named by `EngineSpec.key` (the file names of the engine store):

- text encoder: batch 2·k, 77 tokens: the pipeline encodes [negative prompt, prompt] together, k 77-token
  chunks each (long prompts), whatever the image batch (it repeats the result per image).
- U-Net: batch 2·B (classifier-free guidance runs uncond and cond in one batch), latents H/8 × W/8,
  encoder_hidden_states with 77·k tokens.
- VAE decoder: batch B at H/8 × W/8. VAE encoder (img2img, inpainting): batch 1 at H × W.

A request with fewer rows than the engine's batch (guidance off: 1 prompt, B rows) runs in that engine
padded with zeros (`fit`): every layer of these models treats batch rows independently.

This lives in sdrt.runtime.engines, not sdrt.export, because the runtime picks engines with it and must not import
the exporter (torch).
"""
from __future__ import annotations

from dataclasses import dataclass

from ...errors import InvalidRequest
from .. import names
from ..manifest import Manifest, residual_shapes

PRECISIONS = ("fp16", "fp32")
MAX_CHUNKS = 8  # 77·8 = 616 tokens: well past any prompt people write; keeps engine sizes sane


@dataclass(frozen=True)
class EngineSpec:
    component: str
    batch: int  # the engine's own batch (2·B for the U-Net, 2·k for the text encoder)
    height: int | None  # image pixels; None for the text encoder
    width: int | None
    tokens: int | None  # 77·k where the graph has a token axis
    precision: str  # requested: "fp16" or "fp32" (the VAE may fall back to fp32, see the engine manifest)
    shapes: tuple[tuple[str, tuple[int, ...]], ...]  # input name -> static shape, in graph order

    @property
    def key(self) -> str:
        """File stem in the store, e.g. unet-512x512-b2-t77-fp16, text_encoder-b2-t77-fp16, vae_decoder-512x512-b1-fp16."""
        parts = [self.component]
        if self.height is not None:
            parts.append(f"{self.height}x{self.width}")
        parts.append(f"b{self.batch}")
        if self.tokens is not None:
            parts.append(f"t{self.tokens}")
        parts.append(self.precision)
        return "-".join(parts)

    @property
    def input_shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self.shapes)


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise InvalidRequest(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


def check_sizes(sizes, scale: int) -> list[tuple[int, int]]:
    """[(height, width)], each a positive multiple of the VAE's scale factor (8)."""
    out = []
    for size in sizes:
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        for value, what in ((h, "height"), (w, "width")):
            if isinstance(value, bool) or not isinstance(value, int) or value < scale or value % scale:
                raise InvalidRequest(f"engine {what} must be a positive multiple of {scale}, got {value!r}")
        if (h, w) not in out:
            out.append((h, w))
    if not out:
        raise InvalidRequest("give at least one size to build engines for")
    return out


def default_sizes(manifest: Manifest) -> list[tuple[int, int]]:
    """The bundle's default image size: what `sdrt generate` uses without --height/--width; the model family's
    native size for a manifest that records none."""
    if manifest.default_height and manifest.default_width:
        return [(manifest.default_height, manifest.default_width)]
    return [manifest.model_family.native_size(manifest)]


def _inputs(manifest: Manifest, component: str) -> dict[str, tuple]:
    """Input name -> the manifest's shape (ints static, strings dynamic); the family's standard names when the
    manifest was derived from an optimum folder and lists none."""
    graph = manifest.graphs[component]
    if graph.inputs:
        return {t.name: tuple(t.shape) for t in graph.inputs}
    return manifest.model_family.default_inputs(component)


def _fill(declared: tuple, wanted: tuple[int, ...], component: str, name: str) -> tuple[int, ...]:
    """`wanted`, checked against the graph's static dims (a graph exported for other sizes is refused)."""
    if len(declared) != len(wanted):
        if len(declared) == 0:
            return ()  # optimum's U-Net takes one scalar timestep
        raise InvalidRequest(f"{component} input {name!r} has rank {len(declared)}, expected {len(wanted)}")
    for have, want in zip(declared, wanted):
        if isinstance(have, int) and have != want:
            raise InvalidRequest(f"{component} input {name!r} is fixed at {declared} in the graph; "
                                 f"an engine for {wanted} cannot be built from it")
    return tuple(wanted)


def _shapes(manifest: Manifest, component: str, rows: int, h: int, w: int, tokens: int) -> dict[str, tuple]:
    base = names.UNET if names.is_unet(component) else component  # a hypernetwork variant: the U-Net's + strengths
    want = manifest.model_family.input_shapes(manifest, base, rows, h, w, tokens)
    declared = _inputs(manifest, component)
    want |= {n: () for n in declared if base != component and names.is_strength(n)}
    if component == names.UNET_CONTROLNET:  # the ControlNet residuals, at the latent size's levels
        f = manifest.vae_scale_factor
        want |= residual_shapes(manifest.residuals, rows, h // f, w // f)
    unknown = [n for n in declared if n not in want]
    if unknown:
        raise InvalidRequest(f"{component} graph has inputs {unknown} that sdrt cannot give shapes to")
    return {n: _fill(declared[n], want[n], component, n) for n in declared}


def engine_specs(manifest: Manifest, sizes, batch: int = 1, precision: str = "fp16",
                 chunks: int = 1, hypernetworks=(), controlnet: bool = False) -> list[EngineSpec]:
    """Every engine a pipeline needs for `sizes` at image batch `batch` and prompts of up to `chunks` × 77 tokens;
    hypernetworks: names of the bundle's hypernetworks whose U-Net variants to build too (at the U-Net's shapes);
    controlnet: the U-Net that takes ControlNet residuals too (the ControlNets' own: controlnet_specs)."""
    precision = check_precision(precision)
    if isinstance(batch, bool) or not isinstance(batch, int) or not 1 <= batch <= 64:
        raise InvalidRequest(f"batch must be an integer from 1 to 64, got {batch!r}")
    if isinstance(chunks, bool) or not isinstance(chunks, int) or not 1 <= chunks <= MAX_CHUNKS:
        raise InvalidRequest(f"prompt chunks (77 tokens each) must be from 1 to {MAX_CHUNKS}, got {chunks!r}")
    tokens = manifest.tokenizer_max_length * chunks
    sizes = check_sizes(sizes, manifest.vae_scale_factor)
    variants = [_variant(manifest, name) for name in hypernetworks]
    if controlnet:
        if names.UNET_CONTROLNET not in manifest.graphs:
            raise InvalidRequest("this bundle has no U-Net that takes ControlNet residuals; add it with "
                                 "`sdrt controlnet prepare BUNDLE` first")
        variants.append(names.UNET_CONTROLNET)
    text_rows = 2 * chunks
    specs = [EngineSpec(comp, text_rows, None, None, manifest.tokenizer_max_length, precision,
                        tuple(_shapes(manifest, comp, text_rows, 0, 0, tokens).items()))
             for comp in manifest.model_family.text_components if comp in manifest.graphs]
    for h, w in sizes:
        for comp, rows, toks in ((names.UNET, 2 * batch, tokens), *((v, 2 * batch, tokens) for v in variants),
                                 (names.VAE_DECODER, batch, None), (names.VAE_ENCODER, 1, None)):
            if comp not in manifest.graphs:
                continue  # a bundle without a VAE encoder: txt2img only
            specs.append(EngineSpec(comp, rows, h, w, toks, precision,
                                    tuple(_shapes(manifest, comp, rows, h, w, tokens).items())))
    return specs


def controlnet_specs(cn, manifest: Manifest, sizes, batch: int = 1, precision: str = "fp16",
                     chunks: int = 1) -> list[EngineSpec]:
    """The engines of ControlNet bundle `cn` (its runtime/controlnet.ControlNetManifest) beside `manifest`'s for the
    same sizes, batch and prompt length: 2·batch rows (guidance; guess mode runs fewer, padded), the image at
    full size."""
    precision = check_precision(precision)
    tokens, rows = manifest.tokenizer_max_length * chunks, 2 * batch
    declared = {t.name for t in cn.graphs[names.CONTROLNET].inputs}
    specs = []
    for h, w in check_sizes(sizes, cn.image_scale):
        f = cn.image_scale
        shapes = {names.SAMPLE: (rows, cn.in_channels, h // f, w // f), names.TIMESTEP: (rows,),
                  names.ENCODER_HIDDEN_STATES: (rows, tokens, cn.text_width), names.CONTROLNET_COND: (rows, 3, h, w)}
        if declared != set(shapes):
            raise InvalidRequest(f"the ControlNet graph takes {sorted(declared)}, not {sorted(shapes)}; re-export it")
        specs.append(EngineSpec(names.CONTROLNET, rows, h, w, tokens, precision, tuple(shapes.items())))
    return specs


def _variant(manifest: Manifest, name: str) -> str:
    entry = manifest.hypernetworks.get(name)
    if entry is None:
        have = ", ".join(sorted(manifest.hypernetworks)) or "none"
        raise InvalidRequest(f"hypernetwork {name!r} is not in this bundle (it has: {have}); add it with "
                             "`sdrt hypernetwork add BUNDLE FILE.pt` first")
    return entry["component"]


def fit(engine_shapes: dict[str, tuple], feed_shapes: dict[str, tuple]) -> int | None:
    """Rows of zero padding that make `feed_shapes` the engine's shapes, or None when they can't: every dim
    but the batch must match, and the feeds may have fewer rows (never more) than the engine's batch."""
    if set(engine_shapes) != set(feed_shapes):
        return None
    pads = set()
    for name, want in engine_shapes.items():
        got = tuple(feed_shapes[name])
        if len(got) != len(want) or got[1:] != tuple(want[1:]):
            return None
        if not want:
            continue  # a 0-d input (optimum's scalar timestep) has no batch
        if not 0 < got[0] <= want[0]:
            return None
        pads.add(want[0] - got[0])
    if len(pads) > 1:
        return None  # inputs disagree on the batch
    return pads.pop() if pads else 0
