"""The torch modules Stable Diffusion 1.x/2.x components are traced through: each wraps the diffusers or
transformers model as `.m` (the CPU graph pass retraces it, LoRA's weight map reads its parameter names) and
takes the graph's inputs in order, by optimum's names (runtime/names.py)."""
from __future__ import annotations

import inspect


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
