"""Model families, the runtime's side: what sets one family of latent diffusion models apart from another.

A family says which graphs a bundle of it needs, what its U-Net takes besides the latents and the timestep
(the conditioning inputs and their shapes, for TensorRT's static profiles), and how a request's prompts become
those inputs (its text side: tokenizers, lookup tables, text encoders). The pipeline's denoise loop hands the
family's conditioning dict to the U-Net without looking inside it. SD 1.x and SD 2.x are one family (`sd`)
with different settings, read from the bundle's manifest.

The manifest names a bundle's family (`"family"`, absent for `sd`: bundles from before families had a name
read the same). The exporter's side of a family (components, tracing, check inputs) is sdrt.export.families.

Imports: at import time this package needs only sdrt.runtime.names and numpy, so the manifest and the engines
may ask it for shapes; `open_text` imports the text side (text, tokenizer) when it runs. Nothing here imports
the pipeline or the engines: what the conditioning needs of a request is passed in.
"""
from .base import Family, family_of, register, registered, unregister
from .sd import SD

register(SD())

__all__ = ["Family", "SD", "family_of", "register", "registered", "unregister"]
