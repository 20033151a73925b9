"""LoRA applied to the exported graphs, against diffusers' load_lora_weights + fuse_lora on the same file."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import latents, pixels
from test_parity import use_scheduler

from sdrt.errors import InvalidRequest

TOLERANCE = 2 / 255


def _modules(model, kinds: tuple[str, ...]) -> dict[str, torch.nn.Module]:
    return {name: m for name, m in model.named_modules() if name.endswith(kinds) and hasattr(m, "weight")}


def write_lora(path, unet, text_encoder, style: str, rank: int = 4, seed: int = 0) -> list:
    """A random LoRA on every attention projection (and SD1's 1x1-conv proj_in), in kohya or PEFT naming.
    Returns the text encoder's [(layer, delta at weight 1)]."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    tensors, te_deltas = {}, []
    te_root = getattr(text_encoder, "text_model", text_encoder)
    targets = [("unet", n, m) for n, m in _modules(unet, ("to_q", "to_k", "to_v", "to_out.0", "proj_in")).items()]
    targets += [("te", n, m) for n, m in _modules(te_root, ("q_proj", "v_proj", "fc1")).items()]
    for comp, name, m in targets:
        w = m.weight
        down = torch.randn((rank, *w.shape[1:]), generator=g) * 0.3  # (r, in[, kh, kw])
        up = torch.randn((w.shape[0], rank, *([1, 1] if w.ndim == 4 else [])), generator=g) * 0.3
        if comp == "te":
            te_deltas.append((m, (up.reshape(up.shape[0], rank) @ down.reshape(rank, -1)).reshape(w.shape)
                              * (2.0 / rank if style == "kohya" else 1.0)))
        if style == "kohya":
            key = f"lora_{comp}_" + ("text_model_" if comp == "te" else "") + name.replace(".", "_")
            tensors |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(2.0)}
        else:
            key = ("unet." if comp == "unet" else "text_encoder.text_model.") + name
            tensors |= {f"{key}.lora_A.weight": down, f"{key}.lora_B.weight": up}
    save_file(tensors, str(path))
    unet_only = {k: v for k, v in tensors.items() if k.startswith(("lora_unet_", "unet."))}
    save_file(unet_only, str(path.with_name(path.stem + "_unet.safetensors")))
    return te_deltas


def reference_with_lora(ref, path, te_deltas, scale: float, **kwargs):
    """diffusers with the LoRA fused: load_lora_weights + fuse_lora for the U-Net. diffusers 0.42 loads
    text-encoder LoRAs under transformers 4's `text_model.` names, which transformers 5 dropped (it reports the
    whole text encoder MISSING), so the text encoder's deltas are added to its torch weights directly."""
    use_scheduler(ref, "euler")
    ref.load_lora_weights(str(path.with_name(path.stem + "_unet.safetensors")), adapter_name="ref")
    with torch.no_grad():
        for layer, delta in te_deltas:
            layer.weight += scale * delta
    try:
        ref.fuse_lora(lora_scale=scale)
        return ref(num_inference_steps=6, output_type="np", **kwargs).images
    finally:
        ref.unfuse_lora()
        ref.unload_lora_weights()
        with torch.no_grad():
            for layer, delta in te_deltas:
                layer.weight -= scale * delta


@pytest.mark.parametrize("style", ["kohya", "peft"])
def test_lora_matches_diffusers_fuse_lora_and_unloads_exactly(bundles, reference, tmp_path, style):
    import sdrt

    ref = reference["sd1"]
    path = tmp_path / f"shiny_{style}.safetensors"
    te_deltas = write_lora(path, ref.unet, ref.text_encoder, style)
    pipe = sdrt.Pipeline.load(bundles["sd1"])
    lat, prompt = latents(1, seed=8), "a red circle on a blue background"
    base = pixels(pipe.txt2img(prompt, steps=6, latents=lat))
    got = pixels(pipe.txt2img(prompt, steps=6, latents=lat, loras=[(path, 0.8)]))
    want = reference_with_lora(ref, path, te_deltas, 0.8, prompt=prompt, latents=torch.from_numpy(lat))
    assert np.abs(got - (want * 255).round() / 255).max() <= TOLERANCE
    assert np.abs(got - base).mean() > 1e-3, "the LoRA should change the image"
    assert np.array_equal(pixels(pipe.txt2img(prompt, steps=6, latents=lat)), base)  # base weights restored


def test_two_loras_add_up_and_prompt_tags_pick_them(bundles, reference, tmp_path):
    import sdrt

    ref = reference["sd1"]
    write_lora(tmp_path / "a.safetensors", ref.unet, ref.text_encoder, "kohya", seed=1)
    write_lora(tmp_path / "b.safetensors", ref.unet, ref.text_encoder, "peft", seed=2)
    pipe = sdrt.Pipeline.load(bundles["sd1"])
    pipe.lora_dirs = [tmp_path]
    lat = latents(1, seed=9)
    both = pipe.txt2img("a cat <lora:a:0.5> <lora:b:0.7>", steps=4, latents=lat)
    assert "Lora: a: 0.5, b: 0.7" in both[0].info["parameters"]
    explicit = pipe.txt2img("a cat", steps=4, latents=lat,
                            loras=[(tmp_path / "a.safetensors", 0.5), (tmp_path / "b.safetensors", 0.7)])
    assert np.array_equal(pixels(both), pixels(explicit))
    only_a = pipe.txt2img("a cat <lora:a:0.5>", steps=4, latents=lat)
    assert not np.array_equal(pixels(only_a), pixels(both))


def test_lora_errors_name_the_problem(pipes, tmp_path):
    from safetensors.numpy import save_file

    pipe = pipes["sd1"]
    save_file({"lora_unet_no_such_layer.lora_down.weight": np.ones((2, 4), np.float32),
               "lora_unet_no_such_layer.lora_up.weight": np.ones((4, 2), np.float32)}, str(tmp_path / "odd.safetensors"))
    save_file({"weight": np.ones(3, np.float32)}, str(tmp_path / "notlora.safetensors"))
    cases = [
        ("a <lora:missing:1>", None, "LoRA 'missing' from the prompt was not found as missing.safetensors"),
        ("a <lora:odd:x>", None, "LoRA tag '<lora:odd:x>' has weight 'x', not a number"),
        ("a", [(tmp_path / "odd.safetensors", 1.0)], "targets 'no_such_layer', which this model's unet does not have"),
        ("a", [(tmp_path / "notlora.safetensors", 1.0)], "holds no LoRA weights sdrt knows"),
        ("a", [(tmp_path / "odd.safetensors", float("nan"))], "has weight nan; give a finite number"),
    ]
    for prompt, loras, message in cases:
        with pytest.raises(InvalidRequest, match=message.replace("(", r"\(").replace(")", r"\)")):
            pipe.txt2img(prompt, steps=1, loras=loras)
