"""The torch side: load a checkpoint, trace it to ONNX, check each graph against torch, write a bundle; and
build TensorRT engines from a bundle (`build`).

The only part of sdrt that imports torch, diffusers, transformers or onnx (install the `export` extra).
Imports point one way: sdrt.export uses sdrt.runtime (graph names, the manifest it writes, the engine's rules),
sdrt.runtime never imports sdrt.export. `bundle` runs the stages; `families/` says what each model family's
components are; `passes/` rewrites exported graphs.
"""
from .bundle import export_bundle
from .controlnet import export_controlnet
from .controlnet_source import is_controlnet
from .controlnet_unet import prepare as prepare_controlnet
from .hypernet_bundle import add_hypernetwork, add_stack, remove_hypernetwork

__all__ = ["add_hypernetwork", "add_stack", "export_bundle", "export_controlnet", "is_controlnet",
           "prepare_controlnet", "remove_hypernetwork"]
