"""AUTOMATIC1111's /sdapi/v1 routes (modules/api/api.py), on sdrt's jobs: generation, progress, interrupt, options,
and the lists clients probe at start-up."""
from __future__ import annotations

import time

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from ..runtime import samplers
from . import a1111, controlnet_units
from .waiting import wait_for
from .schema import Img2Img, PngInfo, Txt2Img
from .work import img2img_work, response, txt2img_work

router = APIRouter(prefix="/sdapi/v1")


def _service(request: Request):
    return request.app.state.service


@router.post("/txt2img")
async def txt2img(body: Txt2Img, request: Request):
    return await _generate(body, request, txt2img_work)


@router.post("/img2img")
async def img2img(body: Img2Img, request: Request):
    return await _generate(body, request, img2img_work)


async def _generate(body, request: Request, make):
    service, access = _service(request), request.app.state.access
    _check_scripts(body)
    work = await run_in_threadpool(make, body, service, access.max_prompt_chars)  # decodes images: off the loop
    job = service.submit(work, body.force_task_id)
    await wait_for(job, request, service)
    return await run_in_threadpool(response, body, job, service)


def _check_scripts(body) -> None:
    """A1111 answers 422 for a script it doesn't have; the ControlNet extension's is sdrt's own."""
    from fastapi import HTTPException
    if body.script_name:
        raise HTTPException(422, detail=f"Script '{body.script_name}' not found")
    for title in body.alwayson_scripts or {}:
        if title.lower() != controlnet_units.TITLE:
            raise HTTPException(422, detail=f"always on script {title} not found")


@router.get("/progress")
def progress(request: Request, skip_current_image: bool = False):
    """The job running now (the oldest, on any replica) in A1111's terms; idle: zeros."""
    service = _service(request)
    running = service.running_statuses()
    if not running:
        queued = service.counts()["queued"]
        return {"progress": 0.0, "eta_relative": 0.0, "state": _state(None, queued), "current_image": None,
                "textinfo": None, "current_task": None}
    job = running[0]
    parts, steps = job["parts"], max(job["steps"], 1)
    value = min(0.01 + job["parts_done"] / parts + job["step"] / steps / parts, 1.0)
    elapsed = time.time() - (job["started"] or time.time())
    return {"progress": value, "eta_relative": max(elapsed / value - elapsed, 0.0), "state": _state(job, 0),
            "current_image": None, "textinfo": None, "current_task": job["id"]}


def _state(job: dict | None, queued: int) -> dict:
    if job is None:
        return {"skipped": False, "interrupted": False, "stopping_generation": False, "job": "",
                "job_count": queued, "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0}
    return {"skipped": job["skipped"], "interrupted": job["interrupted"], "stopping_generation": False,
            "job": f"job {job['id']}", "job_count": job["parts"],
            "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job["created"])),
            "job_no": job["parts_done"], "sampling_step": job["step"], "sampling_steps": job["steps"]}


@router.post("/interrupt")
def interrupt(request: Request):
    """A1111's meaning: the job running now stops at its next step and returns what it has."""
    _service(request).interrupt("interrupt")
    return {}


@router.post("/skip")
def skip(request: Request):
    """The iteration running now ends at its next step; the job goes on with its next one."""
    _service(request).interrupt("skip")
    return None


@router.get("/options")
def get_options(request: Request):
    current, options = _service(request).chosen()
    return {"samples_format": "png", "CLIP_stop_at_last_layers": 1, "eta_ddim": 0.0, "sd_vae": "Automatic",
            **options, "sd_model_checkpoint": current.title, "sd_checkpoint_hash": current.sha256}


@router.post("/options")
def set_options(options: dict, request: Request):
    clip_skip = options.get("CLIP_stop_at_last_layers")
    if clip_skip is not None:
        from ..runtime.request import check_int
        check_int(clip_skip, "CLIP_stop_at_last_layers", 1, 12)
    _service(request).set_options(options)
    return None


@router.get("/sd-models")
def sd_models(request: Request):
    return [{"title": m.title, "model_name": m.name, "hash": m.hash, "sha256": m.sha256, "filename": m.name,
             "config": None} for m in _service(request).models.models]


@router.get("/samplers")
def sampler_list():
    return [{"name": c.label, "aliases": [c.name], "options": {}} for c in samplers.SAMPLERS.values()]


@router.get("/schedulers")
def scheduler_list():
    return a1111.SCHEDULERS


@router.get("/scripts")
def scripts(request: Request):
    have = [controlnet_units.TITLE] if _service(request).models.nets else []
    return {"txt2img": have, "img2img": list(have)}


@router.get("/embeddings")
def embeddings(request: Request):
    service = _service(request)
    loaded = {}
    for name in service.embedding_names():
        loaded[name] = {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": None,
                        "vectors": None}
    return {"loaded": loaded, "skipped": {}}


@router.get("/loras")
def loras(request: Request):
    return _service(request).models.loras()


@router.get("/hypernetworks")
def hypernetwork_list(request: Request):
    return [{"name": name, "path": None} for name in _service(request).hypernetwork_names()]


@router.get("/upscalers")
def upscalers():
    return [{"name": "None", "model_name": None, "model_path": None, "model_url": None, "scale": 4}]


# What sdrt has none of: the lists clients read at start-up, empty.
for _path in ("/latent-upscale-modes", "/sd-vae", "/prompt-styles", "/face-restorers", "/script-info", "/extensions"):
    router.add_api_route(_path, lambda: [], methods=["GET"], name=_path.strip("/"))


@router.post("/png-info")
def png_info(body: PngInfo):
    image = a1111.decode_image(body.image, "image")
    text = image.info.get("parameters")
    items = {k: v for k, v in image.info.items() if isinstance(v, str)}
    if text is None:
        return {"info": "", "items": items, "parameters": {}}
    return {"info": text, "items": items, "parameters": a1111.parse_infotext(text)}


# Refreshes: the served bundles are fixed at start (sdrt serve --model ...), LoRA folders are listed on every /loras
# call, and there are no VAEs or embedding folders to rescan.
for _path in ("/refresh-checkpoints", "/refresh-loras", "/refresh-vae", "/refresh-embeddings"):
    router.add_api_route(_path, lambda: None, methods=["POST"], name=_path.strip("/"))


# -- the ControlNet extension's routes ---------------------------------------------------------------------------
controlnet_router = APIRouter(prefix="/controlnet")


@controlnet_router.get("/model_list")
def controlnet_models(request: Request):
    return {"model_list": [n.title for n in _service(request).models.nets]}


@controlnet_router.get("/module_list")
def controlnet_modules():
    return {"module_list": list(controlnet_units.MODULES)}


@controlnet_router.get("/version")
def controlnet_version():
    return {"version": 2}
