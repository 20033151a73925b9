"""The torch side: load a diffusers checkpoint, trace it to ONNX, verify against torch, write a bundle.

The only part of sdrt that imports torch, diffusers, transformers or onnx (install the `export` extra).
"""
from .bundle import export_bundle

__all__ = ["export_bundle"]
