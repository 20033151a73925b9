"""Stable Diffusion 1.x and 2.x: one CLIP text encoder whose hidden states the U-Net cross-attends to.

What differs between 1.x and 2.x (the text encoder's width and pad token, epsilon or v-prediction, the
native size) is data in the manifest, not code here. Reference: diffusers' StableDiffusionPipeline
(`encode_prompt`, and the U-Net call in `__call__`).
"""
from __future__ import annotations

import numpy as np

from .. import names
from .base import Family


class SD(Family):
    name = "sd"
    required_components = (names.TEXT_ENCODER, names.UNET, names.VAE_DECODER)
    text_components = (names.TEXT_ENCODER,)

    def open_text(self, bundle, manifest, engines):
        """The CLIP tokenizer of tokenizer/ and a TextEncoder over the text_encoder engine (text.py)."""
        from ..text import TextEncoder, load_token_embeddings  # here: the text side imports the engines, which
        from ..tokenizer import ClipTokenizer  # import this package for the shapes

        tokenizer = ClipTokenizer.from_folder(bundle / "tokenizer", manifest.tokenizer_max_length,
                                              manifest.tokenizer_pad_id)
        table = load_token_embeddings(bundle, manifest) if manifest.token_embeddings else None
        return TextEncoder(engines, tokenizer, table)

    def conditioning(self, pipe, job) -> dict[str, np.ndarray]:
        """encoder_hidden_states (2B, 77·k, D): [negative; positive], each prompt repeated per image; (B, 77·k, D)
        without guidance. A1111 pads the two prompts to the same k chunks (text.py)."""
        if job.guidance <= 1.0:
            text = np.repeat(pipe.encode_prompt([job.prompt], job.text), job.batch, axis=0)  # (B, 77·k, D)
        else:
            uncond, cond = np.split(pipe.encode_prompt([job.negative_prompt, job.prompt], job.text), 2)
            text = np.concatenate([np.repeat(uncond, job.batch, axis=0), np.repeat(cond, job.batch, axis=0)])
        return {names.ENCODER_HIDDEN_STATES: text}

    def input_shapes(self, manifest, component, rows, height, width, tokens):
        m, f = manifest, manifest.vae_scale_factor
        want = {
            names.INPUTS_EMBEDS: (rows, m.tokenizer_max_length, m.text_hidden_size),
            names.INPUT_IDS: (rows, m.tokenizer_max_length),
            names.TIMESTEP: (rows,),
            names.ENCODER_HIDDEN_STATES: (rows, tokens, m.text_hidden_size),
            names.LATENT_SAMPLE: (rows, m.latent_channels, height // f, width // f),
        }
        if component == names.UNET:
            want[names.SAMPLE] = (rows, m.unet_in_channels, height // f, width // f)
            declared = {t.name: t.shape for t in m.graphs[names.UNET].inputs}
            width_ = declared.get(names.ENCODER_HIDDEN_STATES, (0, 0, None))[2]
            if isinstance(width_, int):  # cross-attention width, when it differs from the encoder's
                want[names.ENCODER_HIDDEN_STATES] = (rows, tokens, width_)
        else:
            want[names.SAMPLE] = (rows, 3, height, width)  # the VAE encoder's image
        return want

    def native_size(self, manifest):
        """512 for SD 1.x, 768 for the v-prediction SD 2.x models (and 512 for SD 2.x base)."""
        return (768, 768) if manifest.prediction_type == "v_prediction" else (512, 512)

    def default_inputs(self, component):
        return {names.TEXT_ENCODER: {names.INPUT_IDS: ("batch", "sequence")},
                names.UNET: {names.SAMPLE: ("batch", "c", "h", "w"), names.TIMESTEP: ("batch",),
                             names.ENCODER_HIDDEN_STATES: ("batch", "tokens", "d")},
                names.VAE_DECODER: {names.LATENT_SAMPLE: ("batch", "c", "h", "w")},
                names.VAE_ENCODER: {names.SAMPLE: ("batch", 3, "h", "w")}}[component]
