"""AUTOMATIC1111's request bodies (modules/api/models.py and the StableDiffusionProcessing* fields), as pydantic models.

Unknown keys are ignored (clients send A1111's every field, and some add their own), and a null counts as the field
left out, as A1111's Optional dataclass fields do. Types are checked here (422 in FastAPI's format, as A1111
answers); ranges by sdrt's own request checks (400, naming the value). Defaults are A1111's, except the size: left
out, it is the bundle's own (an SD 2 768 model, the tiny embedded one).
"""
from __future__ import annotations

from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, model_validator


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _nulls_are_defaults(cls, data: Any) -> Any:
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


class Generation(_Body):
    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] = []
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0.0
    sampler_name: Optional[str] = None
    sampler_index: str = "Euler"
    scheduler: Optional[str] = None
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 50
    cfg_scale: float = 7.0
    width: Optional[int] = None
    height: Optional[int] = None
    eta: Optional[float] = None
    restore_faces: bool = False
    tiling: bool = False
    override_settings: dict[str, Any] = {}
    override_settings_restore_afterwards: bool = True
    refiner_checkpoint: Optional[str] = None
    script_name: Optional[str] = None
    script_args: list[Any] = []
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: dict[str, Any] = {}
    force_task_id: Optional[str] = None
    disable_extra_networks: bool = False


class Txt2Img(Generation):
    enable_hr: bool = False
    denoising_strength: Optional[float] = None


class Img2Img(Generation):
    init_images: list[str] = []
    resize_mode: int = 0
    denoising_strength: float = 0.75
    mask: Optional[str] = None
    mask_blur: Optional[int] = None
    mask_blur_x: int = 4
    mask_blur_y: int = 4
    inpainting_fill: int = 0
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = 0
    include_init_images: bool = False


class PngInfo(_Body):
    image: str
