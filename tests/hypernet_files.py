"""AUTOMATIC1111 hypernetwork files written in code, and a torch reference that applies them in diffusers' U-Net.

`a1111_module` builds the K/V module exactly as A1111's HypernetworkModule.__init__ does
(modules/hypernetworks/hypernetwork.py; ../shared/reference/hypernetworks-controlnet.md, part A): per step of
`layer_structure` a Linear, the activation (none for "linear", none after the last Linear unless
`activate_output`), a LayerNorm (`is_layer_norm`), a Dropout (`dropout_structure`: only shifts the numbering).
`write_a1111` saves them as Hypernetwork.save does: {width: (K state dict, V state dict), settings...}.
The reference (`ReferenceProcessor`) is written here again, independently of sdrt/export/hypernetwork.py.
"""
from __future__ import annotations

import inspect
from pathlib import Path

TEXT_WIDTHS = {"sd1": 48, "sd2": 40}  # the test models' text widths: apart from their attention widths 32, 64
HYPERNET_FILES = {  # the parity files: SD1's with layer norm and a dropout gap, SD2's Hardswish with activate_output
    "sd1": dict(activation="relu", layer_norm=True, dropout_structure=(0, 0.3, 0), activate_output=False),
    "sd2": dict(activation="swish", activate_output=True, layer_structure=(1, 1.5, 1)),
}


def activation_dict():
    """A1111's: its explicit names plus torch.nn's activation classes by lower-cased name."""
    import torch

    d = {"linear": torch.nn.Identity, "relu": torch.nn.ReLU, "leakyrelu": torch.nn.LeakyReLU, "elu": torch.nn.ELU,
         "swish": torch.nn.Hardswish, "tanh": torch.nn.Tanh, "sigmoid": torch.nn.Sigmoid}
    d.update({name.lower(): cls for name, cls in inspect.getmembers(torch.nn.modules.activation)
              if inspect.isclass(cls) and cls.__module__ == "torch.nn.modules.activation"})
    return d


def a1111_module(dim: int, layer_structure, activation: str, layer_norm: bool, activate_output: bool,
                 dropout_structure=None, std: float = 0.3, generator=None):
    import torch

    layers = []
    for i in range(len(layer_structure) - 1):
        layers.append(torch.nn.Linear(int(dim * layer_structure[i]), int(dim * layer_structure[i + 1])))
        if activation == "linear" or (i >= len(layer_structure) - 2 and not activate_output):
            pass
        else:
            layers.append(activation_dict()[activation]())
        if layer_norm:
            layers.append(torch.nn.LayerNorm(int(dim * layer_structure[i + 1])))
        if dropout_structure is not None and dropout_structure[i + 1] > 0:
            layers.append(torch.nn.Dropout(p=dropout_structure[i + 1]))
    module = torch.nn.Module()
    module.linear = torch.nn.Sequential(*layers)
    with torch.no_grad():  # larger than A1111's Normal(0, 0.01) init, so the images change visibly
        for layer in layers:
            if isinstance(layer, torch.nn.Linear):
                layer.weight.normal_(0.0, std / (layer.in_features ** 0.5), generator=generator)
                layer.bias.normal_(0.0, std, generator=generator)
            elif isinstance(layer, torch.nn.LayerNorm):
                layer.weight.uniform_(0.5, 1.5, generator=generator)
                layer.bias.normal_(0.0, 0.1, generator=generator)
            elif isinstance(layer, torch.nn.PReLU):
                layer.weight.fill_(0.1)
    return module.eval()


def write_a1111(path: Path, widths, layer_structure=(1, 2, 1), activation: str = "relu", layer_norm: bool = False,
                activate_output: bool | None = False, dropout_structure=None, legacy: bool = False,
                std: float = 0.3, seed: int = 0) -> dict:
    """Save a hypernetwork as A1111 does; returns {width: (K module, V module)} (torch, eval mode).
    activate_output None: the key is left out (early files). legacy: linear1/linear2 keys (the first format:
    layer_structure (1, 2, 1) without activation)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    modules = {w: tuple(a1111_module(w, layer_structure, activation, layer_norm,
                                     True if activate_output is None else activate_output,
                                     dropout_structure, std, g) for _ in range(2)) for w in widths}
    data = {}
    for w, pair in modules.items():
        dicts = [m.state_dict() for m in pair]
        if legacy:
            dicts = [{k.replace("linear.0.", "linear1.").replace("linear.1.", "linear2."): v for k, v in d.items()}
                     for d in dicts]
        data[w] = tuple(dicts)
    data.update({"step": 1000, "name": Path(path).stem, "layer_structure": list(layer_structure),
                 "activation_func": activation, "is_layer_norm": layer_norm, "weight_initialization": "Normal",
                 "sd_checkpoint": "0123456789", "sd_checkpoint_name": "test", "use_dropout": dropout_structure is not None,
                 "dropout_structure": list(dropout_structure) if dropout_structure else None,
                 "last_layer_dropout": False, "optional_info": None})
    if activate_output is not None:
        data["activate_output"] = activate_output
    if legacy:
        for key in ("layer_structure", "activation_func", "is_layer_norm", "activate_output", "dropout_structure"):
            data.pop(key, None)
    torch.save(data, str(path))
    return modules


class ReferenceProcessor:
    """A1111's rule inside diffusers' Attention: c = encoder_hidden_states, or the hidden states in
    self-attention; k = to_k(c + s·MLP_k(c)), v = to_v(c + s·MLP_v(c)); attention as AttnProcessor2_0."""

    def __init__(self, modules: dict, strength: float, then=()):
        """then: more (modules, strength) applied after these, in order (A1111's several tags)."""
        self.stack = [(modules, strength), *then]

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **_):
        import torch.nn.functional as F

        c = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        ck = cv = c
        for modules, strength in self.stack:  # A1111's apply_hypernetworks: separate K and V chains
            if c.shape[-1] in modules:
                mk, mv = modules[c.shape[-1]]
                ck, cv = ck + mk.linear(ck) * strength, cv + mv.linear(cv) * strength
        q, k, v = attn.to_q(hidden_states), attn.to_k(ck), attn.to_v(cv)
        b, n, heads = q.shape[0], q.shape[1], attn.heads
        split = [t.reshape(b, t.shape[1], heads, -1).permute(0, 2, 1, 3) for t in (q, k, v)]
        out = F.scaled_dot_product_attention(*split).permute(0, 2, 1, 3).reshape(b, n, -1)
        return attn.to_out[1](attn.to_out[0](out))


class with_processor:
    """diffusers' U-Net with A1111's rule in every attention while inside (then: more files after it)."""

    def __init__(self, unet, modules, strength, then=()):
        self.unet, self.processor = unet, ReferenceProcessor(modules, strength, then)

    def __enter__(self):
        self.before = self.unet.attn_processors
        self.unet.set_attn_processor(self.processor)

    def __exit__(self, *exc):
        self.unet.set_attn_processor(self.before)
