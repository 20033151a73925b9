"""Graph tensor names, defined once. They follow optimum's ONNX export of Stable Diffusion,
so a folder written by `optimum-cli export onnx` runs with the same code."""

TEXT_ENCODER = "text_encoder"
UNET = "unet"
VAE_DECODER = "vae_decoder"
VAE_ENCODER = "vae_encoder"
DEPTH_ESTIMATOR = "depth_estimator"  # only for depth2img models whose source folder carries one (DPT)
COMPONENTS = (TEXT_ENCODER, UNET, VAE_DECODER, VAE_ENCODER, DEPTH_ESTIMATOR)

# text_encoder, as sdrt exports it: inputs_embeds (B, T, D) token embeddings (looked up by the runtime, so
# textual-inversion vectors need no re-export) -> last_hidden_state (B, T, D), hidden_states (B, L+1, T, D): the
# output of the embeddings and of each of the L layers, each through the final layer norm (clip skip picks one).
# optimum's graph instead takes input_ids (B, T) and outputs last_hidden_state, pooler_output (B, D).
INPUT_IDS = "input_ids"
INPUTS_EMBEDS = "inputs_embeds"
LAST_HIDDEN_STATE = "last_hidden_state"
HIDDEN_STATES = "hidden_states"
POOLER_OUTPUT = "pooler_output"
TOKEN_EMBEDDINGS_FILE = "token_embeddings.npy"  # in text_encoder/: (vocab, D) float32, the lookup table

# unet: sample (B, C, h, w), timestep (B,), encoder_hidden_states (B, T, D) -> out_sample (B, 4, h, w)
SAMPLE = "sample"
TIMESTEP = "timestep"
ENCODER_HIDDEN_STATES = "encoder_hidden_states"
OUT_SAMPLE = "out_sample"

# vae_decoder: latent_sample (B, 4, h, w) -> sample (B, 3, 8h, 8w)
LATENT_SAMPLE = "latent_sample"
# vae_encoder: sample (B, 3, H, W) -> latent_parameters (B, 8, H/8, W/8): mean and log-variance, channel-stacked
LATENT_PARAMETERS = "latent_parameters"

# depth_estimator: pixel_values (B, 3, 384, 384) -> predicted_depth (B, H', W')
PIXEL_VALUES = "pixel_values"
PREDICTED_DEPTH = "predicted_depth"

MODEL_FILE = "model.onnx"
EXTERNAL_DATA_FILE = "model.onnx_data"
INT8_MODEL_FILE = "model.int8.onnx"  # beside the U-Net's graph: its MatMuls in int8, opt-in (export/passes/int8.py)
CPU_MODEL_FILE = "model.cpu.onnx"  # beside the U-Net's and VAE decoder's graphs: for ONNX Runtime CPU (cpu_graph.py)
MANIFEST_FILE = "sdrt.json"
LORA_MAP_FILE = "lora_map.json"  # beside the U-Net's and text encoder's graphs: where LoRA-targetable weights live
LORA_COMPONENTS = (TEXT_ENCODER, UNET)

# Hypernetwork variants of the U-Net (export/passes/hypernet.py): unet/hypernet/<name>.onnx (+ .cpu.onnx, and
# <name>.onnx_data with the modules' weights), listed as the component "unet-hypernet-<name>". Their U-Net
# weights are the plain graph's model.onnx_data: a graph's external data is resolved in its component folder.
HYPERNET_FOLDER = "hypernet"
HYPERNET_COMPONENT = "unet-hypernet-"
HYPERNETWORK_STRENGTH = "hypernetwork_strength"  # the variant's scalar input: the strength s


def strength_input(i: int) -> str:
    """The scalar input of member i of a hypernetwork stack (a single file is member 0)."""
    return HYPERNETWORK_STRENGTH if i == 0 else f"{HYPERNETWORK_STRENGTH}_{i}"


def is_strength(name: str) -> bool:
    return name == HYPERNETWORK_STRENGTH or name.startswith(HYPERNETWORK_STRENGTH + "_")


def hypernet_component(name: str) -> str:
    return HYPERNET_COMPONENT + name


def is_unet(component: str) -> bool:
    """The U-Net or one of its variants (same inputs and outputs, and maybe more inputs)."""
    return component in (UNET, UNET_CONTROLNET) or component.startswith(HYPERNET_COMPONENT)


# ControlNet (runtime/controlnet.py). The U-Net variant that takes a ControlNet's residuals, written beside the
# U-Net's graphs (export/passes/residuals.py): unet/model.controlnet.onnx (+ model.controlnet.cpu.onnx), the plain
# graphs with one Add per skip connection and one after the mid block, reading the same unet/model.onnx_data.
# Inputs: the U-Net's, plus down_block_additional_residual_{0..N-1} (N = 12 for SD 1.x/2.x) and
# mid_block_additional_residual, each (B, C_i, h_i, w_i): what diffusers' U-Net takes as
# down_block_additional_residuals / mid_block_additional_residual.
UNET_CONTROLNET = "unet-controlnet"
CONTROLNET_MODEL_FILE = "model.controlnet.onnx"
CONTROLNET_CPU_MODEL_FILE = "model.controlnet.cpu.onnx"
MID_RESIDUAL = "mid_block_additional_residual"
# A ControlNet bundle: controlnet/model.onnx (+ model.cpu.onnx): sample, timestep, encoder_hidden_states and
# controlnet_cond (B, 3, H, W) RGB in [0, 1] -> the residuals, by the names the U-Net variant takes them.
CONTROLNET = "controlnet"
CONTROLNET_COND = "controlnet_cond"
UNET_SHAPED = (UNET, CONTROLNET)  # traced again for their CPU graphs (fused attention, sdrt's group norms)


def down_residual(i: int) -> str:
    return f"down_block_additional_residual_{i}"


def data_dir(rel: str) -> str:
    """The folder (relative to the bundle) a graph's external-data locations are relative to: its component's."""
    return rel.split("/", 1)[0]
