"""Stable Diffusion 1.x and 2.x, the exporter's side: a diffusers folder or a single file, one CLIP text
encoder, a U-Net that cross-attends to its hidden states, and the VAE (plus depth2img's depth estimator).

The U-Net is traced at a latent size that is *not* a multiple of 2**(number of upsamplers), so diffusers takes
its `forward_upsample_size` branch and the graph upsamples to the skip connections' sizes: any height and
width that are multiples of 8 then run, as in diffusers.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from ... import __version__
from ...errors import InvalidRequest
from ...runtime import names
from .. import single_file
from ..folder import load_folder
from . import sd_modules
from .base import ExportFamily, Traced


class SD(ExportFamily):
    name = "sd"

    def claims(self, src: Path) -> bool:
        return True  # the last resort: its loaders say what a folder or file lacks

    def load(self, src, allow_pickle=False, variant=None):
        src = Path(src).expanduser().resolve()
        if src.is_file() or (not src.exists() and src.suffix.lower() in single_file.SUFFIXES):
            return single_file.load_single_file(src, allow_pickle, variant)  # model.safetensors, original layout
        if variant is not None:
            raise InvalidRequest(f"--family is for single-file checkpoints; {str(src)!r} is a folder, whose configs "
                                 "give the family")
        return load_folder(src, allow_pickle)

    def components(self, source) -> dict[str, Traced]:
        """The text encoder (from token embeddings), U-Net, VAE decoder and encoder, and a depth estimator."""
        import torch

        TextEncoder, UNet, VaeDecoder, VaeEncoder, DepthEstimator = sd_modules._wrappers()
        unet, vae, te = source.unet, source.vae, source.text_encoder
        ups = 2 ** (len(unet.config.block_out_channels) - 1)
        h, w = 2 * ups + 1, 3 * ups + 1  # latent trace size: odd on purpose, see the module docstring
        scale = 2 ** (len(vae.config.block_out_channels) - 1)
        seq = te.config.max_position_embeddings
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, te.config.vocab_size - 2, (2, seq), generator=g)
        embeds = te.get_input_embeddings()(ids)  # (2, T, D)
        bhw = {0: "batch", 2: "height", 3: "width"}
        latent_ch, in_ch = vae.config.latent_channels, unet.config.in_channels
        text = Traced(TextEncoder(te), (embeds,), [names.INPUTS_EMBEDS], [names.LAST_HIDDEN_STATE, names.HIDDEN_STATES],
                      {names.INPUTS_EMBEDS: {0: "batch"}, names.LAST_HIDDEN_STATE: {0: "batch"},
                       names.HIDDEN_STATES: {0: "batch"}})
        unet_inputs = (torch.randn(2, in_ch, h, w, generator=g), torch.tensor([500.0, 500.0]),
                       torch.randn(2, seq, unet.config.cross_attention_dim, generator=g))
        unet_traced = Traced(UNet(unet), unet_inputs, [names.SAMPLE, names.TIMESTEP, names.ENCODER_HIDDEN_STATES],
                             [names.OUT_SAMPLE], {names.SAMPLE: bhw, names.TIMESTEP: {0: "batch"},
                                                  names.ENCODER_HIDDEN_STATES: {0: "batch", 1: "tokens"},  # 77·k
                                                  names.OUT_SAMPLE: bhw})
        decoder = Traced(VaeDecoder(vae), (torch.randn(2, latent_ch, h, w, generator=g),), [names.LATENT_SAMPLE],
                         [names.SAMPLE], {names.LATENT_SAMPLE: bhw, names.SAMPLE: bhw})
        encoder = Traced(VaeEncoder(vae), (torch.randn(2, 3, h * scale, w * scale, generator=g),), [names.SAMPLE],
                         [names.LATENT_PARAMETERS], {names.SAMPLE: bhw, names.LATENT_PARAMETERS: bhw})
        out = {names.TEXT_ENCODER: text, names.UNET: unet_traced, names.VAE_DECODER: decoder,
               names.VAE_ENCODER: encoder}
        if source.depth_estimator is not None:  # DPT at its fixed 384x384 input
            out[names.DEPTH_ESTIMATOR] = Traced(DepthEstimator(source.depth_estimator),
                                                (torch.randn(2, 3, 384, 384, generator=g),), [names.PIXEL_VALUES],
                                                [names.PREDICTED_DEPTH], {names.PIXEL_VALUES: {0: "batch"},
                                                                          names.PREDICTED_DEPTH: {0: "batch"}})
        return out

    def check_inputs(self, source, component, height, width, ids):
        """Fixed random inputs for one component at batch 1 and the bundle's default size."""
        rng = np.random.default_rng(1234)
        unet, vae, te = source.unet.config, source.vae.config, source.text_encoder.config
        scale = 2 ** (len(vae.block_out_channels) - 1)
        h, w = height // scale, width // scale
        if component == names.TEXT_ENCODER:
            return {names.INPUTS_EMBEDS: token_embeddings(source)[ids]}
        if component == names.UNET:
            return {names.SAMPLE: rng.standard_normal((1, unet.in_channels, h, w), dtype=np.float32),
                    names.TIMESTEP: np.array([321.0], dtype=np.float32),
                    names.ENCODER_HIDDEN_STATES: rng.standard_normal(  # two chunks: a long prompt's 154 tokens
                        (1, 2 * te.max_position_embeddings, unet.cross_attention_dim), dtype=np.float32)}
        if component == names.VAE_DECODER:
            return {names.LATENT_SAMPLE: rng.standard_normal((1, vae.latent_channels, h, w), dtype=np.float32)}
        if component == names.DEPTH_ESTIMATOR:
            return {names.PIXEL_VALUES: rng.uniform(-1, 1, (1, 3, 384, 384)).astype(np.float32)}
        return {names.SAMPLE: rng.uniform(-1, 1, (1, 3, height, width)).astype(np.float32)}

    def expected_outputs(self, source, component, traced, feeds, ids):
        """What torch gives. The text encoder is checked against CLIPTextModel's own forward on the token ids,
        not against the export wrapper, so a wrapper that drifted from transformers is caught too."""
        import torch

        with torch.no_grad():
            if component == names.TEXT_ENCODER:
                te = source.text_encoder
                out = te(input_ids=torch.from_numpy(ids), output_hidden_states=True)
                final_norm = getattr(te, "text_model", te).final_layer_norm
                return [out.last_hidden_state.numpy(), final_norm(torch.stack(out.hidden_states, dim=1)).numpy()]
            out = traced.module(*(torch.from_numpy(v) for v in feeds.values()))
        return [t.numpy() for t in (out if isinstance(out, tuple) else (out,))]

    def manifest_fields(self, source, tokenizer, pad_id):
        vae, unet, te = source.vae.config, source.unet.config, source.text_encoder.config
        return {"latent_channels": vae.latent_channels, "unet_in_channels": unet.in_channels,
                "vae_scaling_factor": float(vae.scaling_factor),
                "vae_scale_factor": 2 ** (len(vae.block_out_channels) - 1),
                "prediction_type": source.scheduler_config.get("prediction_type", "epsilon"),
                "text_hidden_size": te.hidden_size, "tokenizer_max_length": tokenizer.max_length,
                "tokenizer_pad_id": pad_id, "token_embeddings": f"{names.TEXT_ENCODER}/{names.TOKEN_EMBEDDINGS_FILE}"}

    def residual_layout(self, source):
        from ..controlnet_unet import residual_layout

        return residual_layout(dict(source.unet.config))

    def write_files(self, source, tmp: Path, tokenizer) -> None:
        """Beside the graphs: the text encoder's token-embedding table, the configs in optimum's layout, the
        tokenizer, and model_index.json."""
        np.save(tmp / names.TEXT_ENCODER / names.TOKEN_EMBEDDINGS_FILE, token_embeddings(source))
        src = source.path
        shutil.copy(src / "text_encoder" / "config.json", tmp / names.TEXT_ENCODER / "config.json")
        shutil.copy(src / "unet" / "config.json", tmp / names.UNET / "config.json")
        for comp in (names.VAE_DECODER, names.VAE_ENCODER):
            shutil.copy(src / "vae" / "config.json", tmp / comp / "config.json")
        if (tmp / names.DEPTH_ESTIMATOR).is_dir():
            shutil.copy(src / "depth_estimator" / "config.json", tmp / names.DEPTH_ESTIMATOR / "config.json")
        (tmp / "scheduler").mkdir()
        shutil.copy(src / "scheduler" / "scheduler_config.json", tmp / "scheduler" / "scheduler_config.json")
        tok_dir = tmp / "tokenizer"
        tok_dir.mkdir()
        for f in (src / "tokenizer").iterdir():
            if f.is_file() and f.suffix in (".json", ".txt"):
                shutil.copy(f, tok_dir / f.name)
        tokenizer.save(tok_dir / "tokenizer.json")
        scheduler_class = source.model_index.get("scheduler", [None, "PNDMScheduler"])[1]
        _write_json(tmp / "model_index.json", {
            "_class_name": "OnnxStableDiffusionPipeline", "_sdrt_version": __version__,
            **{c: ["diffusers", "OnnxRuntimeModel"] for c in names.COMPONENTS if (tmp / c).is_dir()},
            "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", scheduler_class],
            "safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False})


def token_embeddings(source) -> np.ndarray:
    """(vocab, D) float32: the text encoder's lookup table, which the runtime applies."""
    return source.text_encoder.get_input_embeddings().weight.detach().float().numpy()


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
