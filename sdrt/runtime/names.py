"""Graph tensor names, defined once. They follow optimum's ONNX export of Stable Diffusion,
so a folder written by `optimum-cli export onnx` runs with the same code."""

TEXT_ENCODER = "text_encoder"
UNET = "unet"
VAE_DECODER = "vae_decoder"
VAE_ENCODER = "vae_encoder"
COMPONENTS = (TEXT_ENCODER, UNET, VAE_DECODER, VAE_ENCODER)
REQUIRED_COMPONENTS = (TEXT_ENCODER, UNET, VAE_DECODER)

# text_encoder: input_ids (B, T) -> last_hidden_state (B, T, D), pooler_output (B, D)
INPUT_IDS = "input_ids"
LAST_HIDDEN_STATE = "last_hidden_state"
POOLER_OUTPUT = "pooler_output"

# unet: sample (B, C, h, w), timestep (B,), encoder_hidden_states (B, T, D) -> out_sample (B, 4, h, w)
SAMPLE = "sample"
TIMESTEP = "timestep"
ENCODER_HIDDEN_STATES = "encoder_hidden_states"
OUT_SAMPLE = "out_sample"

# vae_decoder: latent_sample (B, 4, h, w) -> sample (B, 3, 8h, 8w)
LATENT_SAMPLE = "latent_sample"
# vae_encoder: sample (B, 3, H, W) -> latent_parameters (B, 8, H/8, W/8): mean and log-variance, channel-stacked
LATENT_PARAMETERS = "latent_parameters"

MODEL_FILE = "model.onnx"
EXTERNAL_DATA_FILE = "model.onnx_data"
MANIFEST_FILE = "sdrt.json"
