"""Hypernetworks in torch, as A1111 computes them: the reference the exporter checks the baked graphs against.

`torch_module` builds a module's x + s·f(x) from the file's weights the way A1111's HypernetworkModule does;
`applied(unet, stack)` runs diffusers' U-Net with A1111's rule in every attention (modules/
sd_hijack_optimizations.py: context = encoder_hidden_states, or the normalised hidden states in self-attention;
k = to_k(c_K), v = to_v(c_V), where c_K and c_V start at c and go through each file of the stack in order).
"""
from __future__ import annotations

import contextlib

from .hypernet_file import Hypernetwork, Module


def torch_module(module: Module):
    """(x, s) -> x + s·f(x) in torch, f built as A1111 builds it (its activation_dict: torch.nn's activations
    by lower-cased class name, "swish" = Hardswish; LayerNorm eps 1e-5), from the file's weights."""
    import torch
    import torch.nn.functional as F

    classes = {k.lower(): v for k, v in vars(torch.nn.modules.activation).items() if isinstance(v, type)}
    classes["swish"] = torch.nn.Hardswish
    ops = []
    for op, layer in module.steps():
        if op == "linear":
            ops.append(lambda h, w=torch.from_numpy(layer.weight), b=torch.from_numpy(layer.bias): F.linear(h, w, b))
        elif op == "ln":
            ops.append(lambda h, w=torch.from_numpy(layer.weight), b=torch.from_numpy(layer.bias):
                       F.layer_norm(h, (w.shape[0],), w, b, 1e-5))
        else:
            act = classes[module.activation]().eval()
            if layer is not None:  # PReLU's learned slope
                act.weight.data = torch.from_numpy(layer.weight.copy())
            ops.append(act)

    def apply(x, strength: float):
        h = x
        for f in ops:
            h = f(h)
        return x + strength * h

    return apply


def chain(stack: list[tuple[Hypernetwork, float]], width: int, kv: str):
    """c -> c_K (kv "k") or c_V ("v"): each file of the stack that has `width`, in order, at its strength."""
    steps = [(torch_module(hn.modules[width]["kv".index(kv)]), s) for hn, s in stack if width in hn.modules]

    def apply(x):
        for f, s in steps:
            x = f(x, s)
        return x

    return apply


class A1111Attention:
    """A diffusers attention processor computing A1111's rule with `stack` [(file, strength)], then scaled
    dot-product attention as diffusers' AttnProcessor2_0."""

    def __init__(self, stack: list[tuple[Hypernetwork, float]]):
        widths = {w for hn, _ in stack for w in hn.modules}
        self.chains = {w: (chain(stack, w, "k"), chain(stack, w, "v")) for w in widths}

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **_):
        import torch.nn.functional as F

        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states  # (B, N, C)
        ck = cv = context
        if (pair := self.chains.get(context.shape[-1])) is not None:
            ck, cv = pair[0](context), pair[1](context)
        q, k, v = attn.to_q(hidden_states), attn.to_k(ck), attn.to_v(cv)
        b, heads = q.shape[0], attn.heads
        q, k, v = (t.view(b, -1, heads, t.shape[-1] // heads).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask)  # (B, heads, N, C/heads)
        out = attn.to_out[1](attn.to_out[0](out.transpose(1, 2).reshape(b, -1, heads * out.shape[-1])))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


@contextlib.contextmanager
def applied(unet, stack: list[tuple[Hypernetwork, float]]):
    """diffusers' UNet2DConditionModel with `stack` in every attention while inside; its processors restored."""
    before = unet.attn_processors
    unet.set_attn_processor(A1111Attention(stack))
    try:
        yield unet
    finally:
        unet.set_attn_processor(before)
