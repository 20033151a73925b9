"""Model families, the exporter's side: what components a model has and how each is traced and checked.

A family (`ExportFamily`) loads a source (a diffusers folder or a single file) into torch modules, lists its
components as `Traced` (module, example inputs, input and output names, dynamic axes), gives the inputs each
exported graph is checked on against torch, and writes the files beside the graphs. The exporter
(export/bundle.py) asks `family_for(src)` and runs the same stages for every family; the bundle's manifest
names the family, whose runtime side (sdrt.runtime.families, same name) then opens it. SD 1.x and 2.x are one
family, `sd`: what differs between them comes from the model's configs.

Imports: export/families may import sdrt.runtime (graph names); sdrt.runtime never imports it.
"""
from .base import ExportFamily, Traced, family_for, register, unregister
from .sd import SD

register(SD())

__all__ = ["ExportFamily", "SD", "Traced", "family_for", "register", "unregister"]
