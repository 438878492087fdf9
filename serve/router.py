"""The style router: the FastAPI app in front of the model (GET /, /styles, /healthz; POST /generate).

`create_api(service, cfg)` builds the app around any `GenerationService` - the Ray Serve
ingress (serve/deployments.py) passes one that calls the batched model deployment; tests can
pass `LocalService(backend)` and exercise the same routes without Ray.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Protocol, Sequence

import numpy as np
from fastapi import FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response

from serve.config import ServeConfig
from serve.schemas import (
    ExportCommandRequest,
    GeneratedImage,
    GenerateRequest,
    GenerateResponse,
    RegionRequest,
    RequestError,
    Sample,
    StyleInfo,
    StylesResponse,
    resolve_mixture,
    resolve_request,
)

logger = logging.getLogger(__name__)
PLAYGROUND_HTML = Path(__file__).with_name("playground.html")


@dataclass
class ModelInfo:
    styles: list[StyleInfo]
    native_size: tuple[int, int]  # (width, height)
    lora_names: list[str] = field(default_factory=list)  # preloaded LoRA adapters

    @property
    def style_names(self) -> list[str]:
        return [s.name for s in self.styles]


class GenerationService(Protocol):
    async def info(self, refresh: bool = False) -> ModelInfo:
        """Styles and native size; `refresh=True` asks the model itself (health checks), not a cache."""
        ...

    async def generate(self, samples: Sequence[Sample]) -> list[np.ndarray]:
        """(H, W, 3) uint8 per sample, in order."""
        ...


class LocalService:
    """In-process service around a StyleModelBackend (tests, notebooks): no batching across requests."""

    def __init__(self, backend):
        self.backend = backend
        self._lock = asyncio.Lock()

    async def info(self, refresh: bool = False) -> ModelInfo:
        return ModelInfo(self.backend.styles(), self.backend.native_size, list(getattr(self.backend, "lora_names", [])))

    async def generate(self, samples):
        async with self._lock:  # one forward at a time, like one replica
            return await asyncio.to_thread(self.backend.generate, list(samples))


def encode_png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


EXAMPLE_BODY = '{"prompt": "a red circle", "style": 0}'
# Fields whose type is a union: pydantic reports one error per member; say it once, in words.
UNION_EXPECTED = {
    "prompt": "a string or a list of strings",
    "style": "a style name (string) or index (integer)",
    "weights": "an object {style name: weight} or a list with one number per style",
}


def _validation_message(exc: RequestValidationError) -> tuple[int, str]:
    """FastAPI's error list -> (status, one readable line per bad field)."""
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        detail = "; ".join(str(e.get("ctx", {}).get("error", e.get("msg"))) for e in errors)
        return 400, f"malformed JSON body ({detail}); send a JSON object like {EXAMPLE_BODY}"
    lines = []
    for e in errors:
        loc = [str(p) for p in e.get("loc", ()) if p != "body"]
        name = ".".join(loc)
        if not loc:
            if e.get("type") == "missing":
                lines.append(f"request body is missing; send a JSON object like {EXAMPLE_BODY}")
            else:
                lines.append(f"the body must be a JSON object like {EXAMPLE_BODY} (got {e.get('input')!r})")
        elif e.get("type") == "extra_forbidden" and loc[0] == "regions" and len(loc) == 3:
            lines.append(f"regions[{loc[1]}]: unknown field {loc[2]!r}; allowed fields: {', '.join(RegionRequest.model_fields)}")
        elif e.get("type") == "extra_forbidden":
            lines.append(f"unknown field {name!r}; allowed fields: {', '.join(GenerateRequest.model_fields)}")
        elif loc[0] == "regions" and len(loc) >= 3 and loc[1].isdigit():
            expected = {"style": UNION_EXPECTED["style"], "weights": UNION_EXPECTED["weights"],
                        "box": "[x0, y0, x1, y1], four fractions of the canvas"}.get(loc[2])
            detail = f"must be {expected}" if expected else e.get("msg")
            lines.append(f"regions[{loc[1]}]: {loc[2]} {detail} (got {e.get('input')!r})")
        elif e.get("type") == "missing":
            lines.append(f"missing required field {name!r}")
        elif loc[0] in UNION_EXPECTED and len(loc) == 2 and not loc[1].isdigit():
            lines.append(f"{loc[0]} must be {UNION_EXPECTED[loc[0]]} (got {e.get('input')!r})")
        else:
            lines.append(f"{name}: {e.get('msg')} (got {e.get('input')!r})")
    return 422, "; ".join(dict.fromkeys(lines))


def create_api(service: GenerationService, cfg: ServeConfig) -> FastAPI:
    async def model_info() -> ModelInfo:
        info = await service.info()
        if cfg.default_size is not None:
            return ModelInfo(info.styles, (cfg.default_size, cfg.default_size), info.lora_names)
        return info

    api = FastAPI(
        title="dmm-ray style router",
        description="One merged DMM model serving every style (and mixtures of styles) in shared batches.",
        version="0.1.0",
    )

    @api.exception_handler(RequestError)
    async def _request_error(_: Request, exc: RequestError):
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    @api.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError):
        status, message = _validation_message(exc)
        return JSONResponse({"error": message}, status_code=status)

    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def playground():
        return HTMLResponse(PLAYGROUND_HTML.read_text())

    @api.get("/healthz")
    async def healthz():
        try:
            info = await asyncio.wait_for(service.info(refresh=True), timeout=10)  # reach the model, not a cache
        except Exception as exc:  # model deployment unreachable: not healthy, but say why
            return JSONResponse({"status": "unavailable", "error": f"{type(exc).__name__}: {exc}"}, status_code=503)
        return {"status": "ok", "model": cfg.model, "num_styles": len(info.styles)}

    @api.get("/styles", response_model=StylesResponse)
    async def styles():
        info = await model_info()
        return StylesResponse(
            styles=info.styles,
            default_steps=cfg.default_steps,
            default_guidance=cfg.default_guidance,
            default_width=info.native_size[0],
            default_height=info.native_size[1],
            limits=cfg.limits.model_dump() | {"api_key_required": cfg.api_key is not None},
            lora=info.lora_names,
        )

    @api.post("/export_command")
    async def export_command(req: ExportCommandRequest):
        """The exact `jobs/export.py` command that bakes this style or mixture into a stock checkpoint
        (the playground shows it; the server itself never writes or serves model files)."""
        from dmm_ray.export import export_command as build_command

        info = await model_info()
        names = info.style_names
        weights = resolve_mixture(names, req.style, req.weights)
        chosen = {n: w for n, w in zip(names, weights) if w > 0}
        if len(chosen) == 1:
            command = build_command(cfg.model_location(), style=next(iter(chosen)), fmt=req.format)
        else:
            command = build_command(cfg.model_location(), style_weights={n: round(w, 6) for n, w in chosen.items()}, fmt=req.format)
        return {"command": command, "mixture": {n: round(w, 6) for n, w in chosen.items()}}

    @api.post(
        "/generate",
        response_model=GenerateResponse,
        responses={200: {"content": {"image/png": {}}, "description": "PNG when the request makes one image"}},
    )
    async def generate(req: GenerateRequest, x_api_key: Optional[str] = Header(None)):
        if cfg.api_key is not None:
            if x_api_key is None:
                raise RequestError(401, "missing API key: send header `X-API-Key: <key>`")
            if not hmac.compare_digest(x_api_key.encode(), cfg.api_key.encode()):
                raise RequestError(403, "wrong API key (header X-API-Key)")
        info = await model_info()
        resolved = resolve_request(req, info.style_names, cfg, info.native_size, info.lora_names)
        images = await service.generate(resolved.samples)
        pngs = await asyncio.to_thread(lambda: [encode_png(im) for im in images])
        if resolved.response_format == "png":
            return Response(
                pngs[0],
                media_type="image/png",
                headers={"X-Seed": str(resolved.seed), "X-Style-Mixture": json.dumps(resolved.mixture)}
                | ({"X-Regions": json.dumps([r.model_dump() for r in resolved.regions])} if resolved.regions else {})
                | ({"X-LoRA": json.dumps(resolved.lora)} if resolved.lora else {}),
            )
        return GenerateResponse(
            images=[
                GeneratedImage(prompt=s.prompt, seed=s.seed, png_base64=base64.b64encode(p).decode())
                for s, p in zip(resolved.samples, pngs)
            ],
            seed=resolved.seed,
            mixture=resolved.mixture,
            regions=resolved.regions,
            steps=resolved.steps,
            guidance=resolved.guidance,
            width=resolved.width,
            height=resolved.height,
            lora=resolved.lora,
        )

    return api
