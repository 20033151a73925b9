"""`sdrt info`: a bundle described in lines (its manifest checked first, by the caller)."""
from __future__ import annotations

from pathlib import Path

from .runtime import names
from .runtime.manifest import Manifest
from .runtime.samplers import SAMPLERS
from .runtime.watermark import payload_for, watermark_available


def describe(bundle: Path, m: Manifest) -> list[str]:
    lines = [f"bundle       {bundle}  ({'all files match their sha256' if m.hashed else 'not hashed: no sdrt.json'})",
             f"model        hash {m.model_hash}, {m.prediction_type}, default size {m.default_width}x{m.default_height}",
             f"latents      {m.latent_channels} channels, 1/{m.vae_scale_factor} of the image, "
             f"VAE scaling factor {m.vae_scaling_factor}",
             f"text         {m.tokenizer_max_length} tokens, pad id {m.tokenizer_pad_id}, hidden size {m.text_hidden_size}"]
    for comp, g in m.graphs.items():
        ins = ", ".join(f"{t.name} {t.dtype}{list(t.shape)}" for t in g.inputs) or "read from the graph"
        if comp == names.UNET_CONTROLNET:
            ins = (f"the U-Net's inputs and {len(m.residuals)} ControlNet residuals (channels "
                   f"{', '.join(str(r['channels']) for r in m.residuals)}): --controlnet CN_BUNDLE")
        lines.append(f"{comp + ' ':<13}{g.path}: {ins}")
        if comp in m.cpu_graphs:
            what = "fused attention and Winograd convolutions" if names.is_unet(comp) else "Winograd convolutions"
            lines.append(f"{'':<13}{m.cpu_graphs[comp]}: the same with {what}, for ONNX Runtime on the CPU")
        if comp in m.int8_graphs:
            lines.append(f"{'':<13}{m.int8_graphs[comp]}: the same with int8 MatMuls (--int8)")
    for name, h in m.hypernetworks.items():
        files = "; ".join(f"{f['file']} (sha256 {f['sha256'][:10]}), widths {', '.join(map(str, f['widths']))}"
                          for f in h.get("stack", [h]))
        tags = " ".join(f"<hypernet:{n}:1>" for n in name.split("+"))
        lines.append(f"hypernetwork {name}: {'a stack of ' if 'stack' in h else ''}{files}: {tags}")
    lines.append("samplers     " + ", ".join(f"{c.name} ({c.label})" for c in SAMPLERS.values()))
    lines.append("watermark    " + (f"active: dwtDct, payload {payload_for(m.text_hidden_size)!r}, on images of at "
                                    "least 256x256 (--no-watermark to skip)" if watermark_available()
                                    else "off: install it with pip install 'sdrt[watermark]'"))
    if m.versions:
        lines.append("exported by  " + ", ".join(f"{k} {v}" for k, v in m.versions.items()))
    return lines
