"""Trace each component to ONNX with dynamic batch, height and width.

Uses torch's TorchScript-based exporter (`dynamo=False`): on these models it is fast and exact, and it keeps
shape arithmetic symbolic. The U-Net is traced at a latent size that is *not* a multiple of
2**(number of upsamplers), so diffusers takes its `forward_upsample_size` branch and the graph upsamples to
the skip connections' sizes: any height and width that are multiples of 8 then run, as in diffusers.
"""
from __future__ import annotations

import inspect
import json
import tempfile
import warnings
from pathlib import Path

from ..runtime import names

OPSET = 17
EXTERNAL_DATA_THRESHOLD = 1_800_000_000  # bytes of weights above which a graph keeps them beside it (protobuf's 2 GB cap)


def _wrappers():
    import torch

    class TextEncoder(torch.nn.Module):
        """CLIP's text transformer from token embeddings on (the lookup stays in the runtime), returning every
        layer's output through the final layer norm for clip skip. Written against the layer stack because
        CLIPTextModel's forward takes only input_ids; the exporter checks it against that forward."""

        def __init__(self, m):
            super().__init__()
            self.m = getattr(m, "text_model", m)  # transformers < 5 wraps the transformer in .text_model
            layer = self.m.encoder.layers[0]
            self.old_layer_api = "causal_attention_mask" in inspect.signature(layer.forward).parameters

        def forward(self, inputs_embeds):
            seq = inputs_embeds.shape[1]
            causal = torch.full((seq, seq), float("-inf")).triu(1)[None, None]  # (1, 1, T, T) additive mask
            h = self.m.embeddings(inputs_embeds=inputs_embeds)  # + position embeddings
            states = [h]
            for layer in self.m.encoder.layers:
                out = layer(h, None, causal) if self.old_layer_api else layer(h, causal)
                h = out[0] if isinstance(out, tuple) else out
                states.append(h)
            normed = self.m.final_layer_norm(torch.stack(states, dim=1))  # (B, L+1, T, D)
            return normed[:, -1], normed

    class UNet(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, sample, timestep, encoder_hidden_states):
            return self.m(sample, timestep, encoder_hidden_states, return_dict=False)[0]

    class VaeDecoder(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, latent_sample):
            return self.m.decode(latent_sample, return_dict=False)[0]

    class VaeEncoder(torch.nn.Module):
        """Outputs the latent distribution's parameters (mean, logvar) so the runtime samples it with numpy."""

        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, sample):
            h = self.m.encoder(sample)
            return self.m.quant_conv(h) if self.m.quant_conv is not None else h

    class DepthEstimator(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, pixel_values):
            return self.m(pixel_values=pixel_values).predicted_depth

    return TextEncoder, UNet, VaeDecoder, VaeEncoder, DepthEstimator


def components(source) -> dict:
    """name -> (torch module, example inputs, input names, output names, dynamic axes)."""
    import torch

    TextEncoder, UNet, VaeDecoder, VaeEncoder, DepthEstimator = _wrappers()
    unet, vae, te = source.unet, source.vae, source.text_encoder
    ups = 2 ** (len(unet.config.block_out_channels) - 1)
    h, w = 2 * ups + 1, 3 * ups + 1  # latent trace size: odd on purpose, see module docstring
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    seq = te.config.max_position_embeddings
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, te.config.vocab_size - 2, (2, seq), generator=g)
    embeds = te.get_input_embeddings()(ids)  # (2, T, D)
    bhw = {0: "batch", 2: "height", 3: "width"}
    latent_ch, in_ch = vae.config.latent_channels, unet.config.in_channels
    out = {
        names.TEXT_ENCODER: (TextEncoder(te), (embeds,), [names.INPUTS_EMBEDS],
                             [names.LAST_HIDDEN_STATE, names.HIDDEN_STATES],
                             {names.INPUTS_EMBEDS: {0: "batch"}, names.LAST_HIDDEN_STATE: {0: "batch"},
                              names.HIDDEN_STATES: {0: "batch"}}),
        names.UNET: (UNet(unet), (torch.randn(2, in_ch, h, w, generator=g), torch.tensor([500.0, 500.0]),
                                  torch.randn(2, seq, unet.config.cross_attention_dim, generator=g)),
                     [names.SAMPLE, names.TIMESTEP, names.ENCODER_HIDDEN_STATES], [names.OUT_SAMPLE],
                     {names.SAMPLE: bhw, names.TIMESTEP: {0: "batch"},
                      names.ENCODER_HIDDEN_STATES: {0: "batch", 1: "tokens"},  # 77·k: long prompts in chunks
                      names.OUT_SAMPLE: bhw}),
        names.VAE_DECODER: (VaeDecoder(vae), (torch.randn(2, latent_ch, h, w, generator=g),), [names.LATENT_SAMPLE],
                            [names.SAMPLE], {names.LATENT_SAMPLE: bhw, names.SAMPLE: bhw}),
        names.VAE_ENCODER: (VaeEncoder(vae), (torch.randn(2, 3, h * scale, w * scale, generator=g),), [names.SAMPLE],
                            [names.LATENT_PARAMETERS], {names.SAMPLE: bhw, names.LATENT_PARAMETERS: bhw}),
    }
    if source.depth_estimator is not None:  # DPT at its fixed 384x384 input
        out[names.DEPTH_ESTIMATOR] = (DepthEstimator(source.depth_estimator),
                                      (torch.randn(2, 3, 384, 384, generator=g),), [names.PIXEL_VALUES],
                                      [names.PREDICTED_DEPTH], {names.PIXEL_VALUES: {0: "batch"},
                                                                names.PREDICTED_DEPTH: {0: "batch"}})
    return out


def export_onnx(module, inputs, input_names, output_names, dynamic_axes, out_dir: Path,
                external_threshold: int = EXTERNAL_DATA_THRESHOLD, lora_targets: bool = False,
                external: bool = False) -> Path:
    """Trace `module` to out_dir/model.onnx; weights over the threshold go to one model.onnx_data beside it.
    `lora_targets`: always keep the weights in model.onnx_data and write lora_map.json (see weight_map.py).
    `external`: always keep them there (a CPU graph beside it reads them too)."""
    import onnx
    import torch

    from . import weight_map

    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent) as scratch, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about python branches: see the module docstring
        raw = Path(scratch) / names.MODEL_FILE
        torch.onnx.export(module, inputs, str(raw), input_names=input_names, output_names=output_names,
                          dynamic_axes=dynamic_axes, opset_version=OPSET, do_constant_folding=True, dynamo=False)
        model = onnx.load(str(raw))  # pulls in any external data torch wrote for a > 2 GB model
    size = sum(len(t.raw_data) for t in model.graph.initializer)
    target = out_dir / names.MODEL_FILE
    digests = weight_map.initializer_digests(model) if lora_targets else {}
    if size > external_threshold or lora_targets or external:
        onnx.save_model(model, str(target), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=names.EXTERNAL_DATA_FILE, size_threshold=0 if lora_targets else 1024)
    else:
        onnx.save_model(model, str(target))
    if lora_targets:
        saved = onnx.load(str(target), load_external_data=False)
        mapping = weight_map.build(weight_map.targets(module.m), digests, saved)
        (out_dir / names.LORA_MAP_FILE).write_text(json.dumps(mapping, indent=1) + "\n")
    return target
