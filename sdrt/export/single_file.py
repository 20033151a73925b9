"""Single-file checkpoints: one `.safetensors` (or, with --allow-pickle, `.ckpt`) in the original Stable
Diffusion (CompVis/LDM) key layout, as model sites distribute them:

    model.diffusion_model.*              the U-Net
    first_stage_model.*                  the VAE
    cond_stage_model.transformer.*       SD 1.x: OpenAI CLIP ViT-L/14 (transformers' key names)
    cond_stage_model.model.*             SD 2.x: OpenCLIP ViT-H/14

diffusers' single-file loader converts the weights (per component, as `StableDiffusionPipeline.from_single_file`
does it); the configs it needs come from `single_file_configs/` (SD 1.5, SD 2.1-base, SD 2.1, shipped with sdrt;
nothing is fetched), with every size replaced by what the tensor shapes say (see SOURCE.md there for what the
weights cannot say). Where diffusers' loader would skip a weight or leave one empty, the export is refused
instead. The result is a `Source` like a diffusers folder's, whose `path` is a temporary folder holding the
configs and the tokenizer (`Source.close()` removes it).

The family (SD 1.x or 2.x) is read from the weights: the text encoder's key layout (CLIP vs OpenCLIP), checked
against the U-Net's cross-attention width. Whether an SD 2.x file predicts v (768 model) or epsilon (512 base)
is not in the weights: the file's ModelSpec metadata says it when present (`modelspec.architecture`,
`modelspec.prediction_type`); otherwise diffusers' own heuristic applies (a `.ckpt` saved at global step 875000,
SD 2.0-base's, is epsilon; anything else is v-prediction, with a warning). `--family` overrides it.
"""
from __future__ import annotations

import json
import re
import shutil
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path

from ..errors import InvalidRequest, NotAModelFolder, PickleRefused, SourceError
from ..runtime.fsutil import sha256_file
from .single_file_shapes import (CLIP, CLIP_MODEL, OPENCLIP, UNET, VAE, indices, layout_error, text_config,
                                 unet_config, vae_config)
from .source import PICKLE_SUFFIXES, Source, check_finite

CONFIGS = Path(__file__).parent / "single_file_configs"
VOCAB = Path(__file__).parent / "clip_tokenizer"
FAMILIES = {"sd1": "SD 1.x (epsilon, 512)", "sd2": "SD 2.x base (epsilon, 512)",
            "sd2-v": "SD 2.x (v-prediction, 768)"}
SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
SUFFIXES = SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES

_FLAT_CLIP = tuple(CLIP + p for p in ("embeddings.", "encoder.", "final_layer_norm."))
SD2_BASE_GLOBAL_STEP = 875000  # diffusers' heuristic: SD 2.0-base's .ckpt was saved at this step (epsilon)



class _Checkpoint(Mapping):
    """The file's tensors by name, read lazily from safetensors (a refused SDXL file is never loaded whole)."""

    def __init__(self, path: Path, allow_pickle: bool):
        self.path, self.metadata, self.global_step = path, {}, None
        self._st, self._tensors = None, None
        suffix = path.suffix.lower()
        if suffix in PICKLE_SUFFIXES:
            if not allow_pickle:
                raise PickleRefused(f"{str(path)!r} is a pickle checkpoint ({suffix}), which can run code when loaded; "
                                    "use its .safetensors version, or pass --allow-pickle to load it in torch's "
                                    "weights_only mode")
            self._tensors = self._load_pickle(path)
        else:
            self._open_safetensors(path)
        # Some SD 1.x files keep CLIP's weights as an older transformers named them, without `text_model.`:
        # read them under today's names (AUTOMATIC1111 renames them the same way).
        self._stored = {}
        for i, key in enumerate(self._keys):
            if key.startswith(_FLAT_CLIP):
                self._keys[i] = CLIP_MODEL + key[len(CLIP):]
                self._stored[self._keys[i]] = key

    def _open_safetensors(self, path: Path) -> None:
        from safetensors import safe_open

        try:
            self._st = safe_open(str(path), framework="pt", device="cpu")
            self._keys = list(self._st.keys())
            self.metadata = dict(self._st.metadata() or {})
        except Exception as e:  # noqa: BLE001 - SafetensorError, OSError, ...: one message
            hint = ("" if path.suffix.lower() in SAFETENSORS_SUFFIXES else
                    "; single files must be .safetensors (or .ckpt/.pt/.pth/.bin with --allow-pickle)")
            raise SourceError(f"{str(path)!r} is not a readable safetensors file ({_first_line(e)}); "
                              f"it may be truncated or not a checkpoint: download it again{hint}") from None

    def _load_pickle(self, path: Path) -> dict:
        import torch

        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001
            raise SourceError(f"{str(path)!r} could not be read in torch's weights_only mode ({_first_line(e)}); it "
                              "is damaged, not a checkpoint, or holds objects other than tensors: use a .safetensors "
                              "version of it") from None
        if isinstance(obj, dict) and isinstance(obj.get("global_step"), int):
            self.global_step = obj["global_step"]
        while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict):
            raise NotAModelFolder(f"{str(path)!r} holds a {type(obj).__name__}, not a dictionary of weights; it is "
                                  "not a Stable Diffusion checkpoint")
        self._keys = [k for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)]
        return {k: obj[k] for k in self._keys}

    def __getitem__(self, key: str):
        if key not in self.keyset:
            raise KeyError(key)
        key = self._stored.get(key, key)
        return self._tensors[key] if self._tensors is not None else self._st.get_tensor(key)

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key) -> bool:
        return key in self.keyset

    @property
    def keyset(self) -> set:
        if not hasattr(self, "_keyset"):
            self._keyset = set(self._keys)
        return self._keyset

    def shape(self, key: str) -> tuple:
        if key not in self.keyset:
            raise KeyError(key)
        key = self._stored.get(key, key)
        if self._tensors is not None:
            return tuple(self._tensors[key].shape)
        return tuple(self._st.get_slice(key).get_shape())

    def load(self, prefixes: tuple[str, ...]) -> dict:
        """Every tensor whose name starts with one of `prefixes`, in memory."""
        return {k: self[k] for k in self._keys if k.startswith(prefixes)}


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


# ---------------------------------------------------------------------------------------------------------------
# What kind of file is it


_LORA_KEY = re.compile(r"^lora_(unet|te\d?)_"  # kohya-ss / AUTOMATIC1111
                       r"|\.(lora_down|lora_up|lora_A|lora_B|hada_w1_a|lokr_w1)\b"  # kohya, PEFT, LyCORIS
                       r"|\.lora\.(down|up)\.")  # older diffusers


def _classify(ck: _Checkpoint) -> str:
    """Refuse what is not an SD 1.x/2.x checkpoint, with what it is; return 'clip' or 'openclip'."""
    name, keys = repr(str(ck.path)), ck.keyset
    arch = ck.metadata.get("modelspec.architecture", "").lower()
    has_unet = UNET + "input_blocks.0.0.weight" in keys
    if not has_unet and ("lora" in arch or "ss_network_module" in ck.metadata
                         or any(_LORA_KEY.search(k) for k in keys)):
        raise NotAModelFolder(f"{name} is a LoRA (a low-rank adapter for a base model), not a full model: export the "
                              f"base model, and apply the LoRA when generating (--lora {ck.path.name})")
    if not has_unet and ("textual-inversion" in arch or "emb_params" in keys
                         or any(k.startswith("string_to_param") for k in keys)):
        raise NotAModelFolder(f"{name} is a textual-inversion embedding, not a full model: export the base model, "
                              f"and pass it when generating (--embedding {ck.path.name})")
    sgm = any(k.startswith("conditioner.embedders.") for k in keys)
    if arch.startswith("stable-diffusion-xl") or (sgm and (any(k.startswith("conditioner.embedders.1.") for k in keys)
                                                          or any(k.startswith(UNET + "label_emb.") for k in keys))):
        raise NotAModelFolder(f"{name} is an SDXL checkpoint (it has conditioner.embedders.* text encoders); SDXL is "
                              "not supported: sdrt exports Stable Diffusion 1.x and 2.x")
    if sgm:
        raise NotAModelFolder(f"{name} is in Stability's newer (sgm) layout, its text encoder under "
                              "conditioner.embedders.* (as SD 2.1 Turbo ships); sdrt reads the original SD 1.x/2.x "
                              "layout (cond_stage_model.*)")
    if not has_unet:
        raise NotAModelFolder(f"{name} is not a Stable Diffusion 1.x/2.x checkpoint: it has no U-Net weights "
                              f"(model.diffusion_model.input_blocks.*){_what_else(ck)}. sdrt reads single files in "
                              "the original layout (model.diffusion_model.*, first_stage_model.*, cond_stage_model.*) "
                              "and diffusers model folders")
    if any(k.startswith(UNET + "label_emb.") for k in keys):
        raise NotAModelFolder(f"{name} has a class-conditioned U-Net (model.diffusion_model.label_emb.*: unCLIP or "
                              "SDXL-style); sdrt exports text-to-image Stable Diffusion 1.x and 2.x")
    missing = [] if {VAE + "encoder.conv_in.weight", VAE + "decoder.conv_in.weight"} <= keys else \
        ["VAE (first_stage_model.*)"]
    if CLIP_MODEL + "embeddings.token_embedding.weight" in keys:
        text = "clip"
    elif OPENCLIP + "token_embedding.weight" in keys:
        text = "openclip"
    else:
        text = None
        missing.append("text encoder (cond_stage_model.transformer.* or cond_stage_model.model.*)")
    if missing:
        raise NotAModelFolder(f"{name} lacks the {' and the '.join(missing)} of a full Stable Diffusion checkpoint "
                              "(some files hold the U-Net only); use a complete checkpoint")
    return text


def _what_else(ck: _Checkpoint) -> str:
    keys = ck.keyset
    if keys and all(k.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")) for k in keys):
        return " (it holds a VAE only)"
    if any(k.startswith(("down_blocks.", "conv_in.", "text_model.", "encoder.down_blocks.")) for k in keys):
        return " (its names are diffusers', as in one component of a model folder: give the folder instead)"
    try:
        from diffusers.loaders.single_file_utils import infer_diffusers_model_type

        kind = infer_diffusers_model_type(ck)
    except Exception:  # noqa: BLE001 - only a hint
        return ""
    return "" if kind == "v1" else f" (diffusers recognises it as {kind!r})"  # v1 is its fallback, not a verdict


def resolve_family(ck: _Checkpoint, text: str, requested: str | None) -> str:
    """sd1, sd2 or sd2-v: from the text encoder's layout, then for SD 2.x the metadata or diffusers' heuristic."""
    name = repr(str(ck.path))
    if requested is not None:
        if requested not in FAMILIES:
            raise InvalidRequest(f"unknown --family {requested!r}; expected one of {', '.join(FAMILIES)}")
        want = "clip" if requested == "sd1" else "openclip"
        if want != text:
            found = "SD 1.x (OpenAI CLIP text encoder)" if text == "clip" else "SD 2.x (OpenCLIP text encoder)"
            raise InvalidRequest(f"--family {requested} does not fit {name}: its weights are {found}; use "
                                 f"{'--family sd1' if text == 'clip' else '--family sd2 or sd2-v'}, or leave it out")
        return requested
    if text == "clip":
        return "sd1"
    arch = ck.metadata.get("modelspec.architecture", "").lower()
    prediction = ck.metadata.get("modelspec.prediction_type", "").lower()
    if arch.startswith("stable-diffusion-v2-768-v") or prediction == "v":
        return "sd2-v"
    if arch.startswith("stable-diffusion-v2-512") or prediction == "epsilon":
        return "sd2"
    if ck.global_step == SD2_BASE_GLOBAL_STEP:
        return "sd2"
    warnings.warn(f"{ck.path.name}: an SD 2.x checkpoint; its weights don't say whether it predicts v (the 768 "
                  "model) or epsilon (the 512 base model), and it has no metadata that does: assuming v-prediction at "
                  "768 as diffusers does. If images come out as noise or flat colour, export it again with "
                  "--family sd2", UserWarning, stacklevel=2)
    return "sd2-v"


def _write_tokenizer_json(folder: Path) -> None:
    """transformers' own tokenizer.json beside vocab.json + merges.txt, which the runtime then loads. From
    vocab + merges alone the runtime's tokenizer does not know that SD 2.x's pad token `!` is a special token,
    which transformers splits off ("wow!!" -> "wow", "!", "!"), and the export's tokenizer check fails."""
    from transformers import CLIPTokenizer

    CLIPTokenizer.from_pretrained(str(folder)).save_pretrained(str(folder))


def write_configs(ck: _Checkpoint, family: str, text: str, folder: Path) -> Path:
    """The family's shipped config folder, sizes from the weights, tokenizer files beside: what diffusers'
    loader reads as `config=`."""
    shutil.copytree(CONFIGS / family, folder)
    for f in ("vocab.json", "merges.txt"):
        shutil.copy(VOCAB / f, folder / "tokenizer" / f)
    _write_tokenizer_json(folder / "tokenizer")
    for comp, make in (("unet", lambda b: unet_config(ck, family, b)), ("vae", lambda b: vae_config(ck, b)),
                       ("text_encoder", lambda b: text_config(ck, text, b))):
        path = folder / comp / "config.json"
        path.write_text(json.dumps(make(json.loads(path.read_text(encoding="utf-8"))), indent=2) + "\n",
                        encoding="utf-8")
    unet = json.loads((folder / "unet" / "config.json").read_text(encoding="utf-8"))
    te = json.loads((folder / "text_encoder" / "config.json").read_text(encoding="utf-8"))
    if unet["cross_attention_dim"] != te["hidden_size"]:
        raise layout_error(ck, f"the U-Net attends to {unet['cross_attention_dim']}-wide text features but the text "
                                f"encoder is {te['hidden_size']} wide")
    return folder


# ---------------------------------------------------------------------------------------------------------------
# Loading


def _strict(ck: _Checkpoint, name: str, expected, converted) -> None:
    """diffusers' loader skips weights it has no place for and leaves missing ones empty: refuse both, before
    loading (the model's names from an empty skeleton, the file's from diffusers' own key conversion)."""
    ignore = re.compile(r"position_ids$")
    expected = {k for k in expected if not ignore.search(k)}
    got = {k for k in converted if not ignore.search(k)}
    missing, unused = sorted(expected - got), sorted(got - expected)
    if missing or unused:
        parts = ([f"{len(missing)} missing (e.g. {missing[0]})"] if missing else []) + \
                ([f"{len(unused)} unused (e.g. {unused[0]})"] if unused else [])
        raise layout_error(ck, f"the {name} weights do not fit the layout read from the file: {', '.join(parts)}")


def _load_components(ck: _Checkpoint, text: str, folder: Path):
    import torch
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sfu
    from diffusers.utils import logging as diffusers_logging
    from transformers import CLIPTextConfig, CLIPTextModel

    modules = {}
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # its EMA and unused-key notices: _strict decides
    try:
        for name, prefix in (("unet", UNET), ("vae", VAE), ("text_encoder", CLIP if text == "clip" else OPENCLIP)):
            part = ck.load((prefix,))
            if name == "text_encoder" and text == "openclip":  # SD 2.x uses the penultimate layer: drop the last
                last = indices(part, OPENCLIP + "transformer.resblocks.")[-1]
                part = {k: v for k, v in part.items()
                        if not k.startswith(f"{OPENCLIP}transformer.resblocks.{last}.")}
            try:
                if name == "text_encoder":
                    with init_empty_weights():
                        skeleton = CLIPTextModel(CLIPTextConfig.from_pretrained(str(folder / name)))
                    if text == "clip":
                        converted = sfu.convert_ldm_clip_checkpoint(part)
                    else:
                        converted = sfu.convert_open_clip_checkpoint(skeleton, part, prefix=OPENCLIP)
                    if not hasattr(skeleton, "text_model"):  # transformers >= 5.6 flattened CLIPTextModel
                        converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
                    _strict(ck, name, skeleton.state_dict(), converted)
                    del converted
                    model = sfu.create_diffusers_clip_model_from_ldm(
                        CLIPTextModel, part, subfolder=name, config=str(folder), torch_dtype=torch.float32,
                        local_files_only=True)
                else:
                    cls = UNet2DConditionModel if name == "unet" else AutoencoderKL
                    config = cls.load_config(str(folder / name))
                    with init_empty_weights():
                        skeleton = cls.from_config(config)
                    convert = sfu.convert_ldm_unet_checkpoint if name == "unet" else sfu.convert_ldm_vae_checkpoint
                    _strict(ck, name, skeleton.state_dict(), convert(part, dict(skeleton.config)))
                    model = cls.from_single_file(part, config=str(folder), subfolder=name, local_files_only=True,
                                                 torch_dtype=torch.float32)
            except SourceError:
                raise
            except Exception as e:  # noqa: BLE001 - shape mismatches and the like: one line
                raise SourceError(f"could not convert the {name} of {str(ck.path)!r} with diffusers' single-file "
                                  f"loader: {_first_line(e)}") from None
            del part, skeleton
            empty = [n for n, t in model.state_dict().items() if t.is_meta]
            if empty:
                raise layout_error(ck, f"diffusers' loader left {len(empty)} {name} weights empty (e.g. {empty[0]})")
            check_finite(name, model)
            modules[name] = model.eval()
    finally:
        diffusers_logging.set_verbosity(verbosity)
    return modules


def load_single_file(path: Path, allow_pickle: bool = False, family: str | None = None) -> Source:
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise NotAModelFolder(f"{str(path)!r} does not exist; give a single-file checkpoint (.safetensors) or a "
                              "diffusers model folder")
    if family is not None and family not in FAMILIES:
        raise InvalidRequest(f"unknown --family {family!r}; expected one of {', '.join(FAMILIES)}")
    ck = _Checkpoint(path, allow_pickle)
    text = _classify(ck)
    family = resolve_family(ck, text, family)
    workdir = tempfile.TemporaryDirectory(prefix="sdrt-single-file-")
    try:
        try:
            folder = write_configs(ck, family, text, Path(workdir.name) / "model")
        except KeyError as e:
            raise layout_error(ck, f"the weight {e.args[0]!r}, which its layout needs, is missing") from None
        modules = _load_components(ck, text, folder)
        return Source(folder, json.loads((folder / "model_index.json").read_text(encoding="utf-8")),
                      modules["text_encoder"], modules["unet"], modules["vae"],
                      json.loads((folder / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8")),
                      sha256_file(path), workdir=workdir)
    except BaseException:
        workdir.cleanup()
        raise
