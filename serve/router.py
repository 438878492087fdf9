"""The style router: the FastAPI app in front of the model (GET /, /styles, /healthz, /readyz; POST /generate).

`create_api(service, cfg)` builds the app around any `GenerationService` - the Ray Serve
ingress (serve/deployments.py) passes one that calls the batched model deployment; tests can
pass `LocalService(backend)` and exercise the same routes without Ray.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hmac
import html
import io
import json
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Protocol, Sequence

import numpy as np
from fastapi import FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from dmm_ray.defaults import PAPER_GUIDANCE, PAPER_NEGATIVE_PROMPT, PAPER_SCHEDULER, PAPER_STEPS
from dmm_ray.styles import StyleError
from serve.config import ServeConfig
from serve.schemas import (
    ErrorResponse,
    ExportCommandRequest,
    GeneratedImage,
    GenerateRequest,
    GenerateResponse,
    RegionRequest,
    RequestError,
    Sample,
    StyleInfo,
    StylesResponse,
    named_mixture,
    resolve_mixture,
    resolve_request,
)

logger = logging.getLogger(__name__)
PLAYGROUND_HTML = Path(__file__).with_name("playground.html")


class Overloaded(RequestError):
    """The model cannot take the request now (its queue is full, or its replica died and is restarting):
    503 with `Retry-After` (the client may retry; nothing was wrong with it)."""

    def __init__(self, message: str, retry_after_s: float = 2.0):
        super().__init__(503, message)
        self.retry_after_s = retry_after_s

    def __reduce__(self):
        return (type(self), (self.message, self.retry_after_s))


class StylesChanged(Overloaded):
    """The model replica's styles are not the ones the router resolved the request against: the model was
    reloaded with other styles (re-merged into its folder, then a replica restarted) after the router read
    them. The route reads them again and resolves the request once more; a second mismatch (replicas of two
    models at once, mid-rollout) is a 503 + Retry-After."""


class SampleFailed(Exception):
    """The model failed on one image (not the client's fault): a 500 for that image's request alone.
    The message is generic; the cause is logged on the replica / router, never sent to the client."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __reduce__(self):
        return (type(self), (self.message,))


def _json_error(status: int, message: str, headers: Optional[dict] = None) -> list[dict]:
    body = json.dumps({"error": message}).encode()
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    head += [(k.lower().encode(), str(v).encode()) for k, v in (headers or {}).items()]
    return [{"type": "http.response.start", "status": status, "headers": head}, {"type": "http.response.body", "body": body}]


JSON_ROUTES = ("/generate", "/export_command")  # the POST routes that read a JSON body


class _DuplicateKey(Exception):  # not a ValueError: json.loads' own errors are left to FastAPI's messages
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _refuse_duplicates(pairs: list) -> dict:
    seen = set()
    for key, _ in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen.add(key)
    return dict(pairs)


def duplicate_json_key(body: bytes) -> Optional[str]:
    """The first key a JSON body gives twice in one object, else None (also for a body that is no JSON: FastAPI
    says what is wrong with it). json.loads keeps the last and drops the first: {"neon": 0.3, "sketch": 0.5,
    "neon": 0.2} would be served as neon 0.2 without a word, where --weights and the YAML configs refuse a key
    given twice."""
    try:
        json.loads(body, object_pairs_hook=_refuse_duplicates)
    except _DuplicateKey as duplicate:
        return duplicate.key
    except (ValueError, RecursionError):
        pass
    return None


class GuardMiddleware:
    """Runs before FastAPI reads a body: on every POST, the API key (401/403) first, so a caller without
    the key learns nothing about what the server would accept; then, on the JSON routes, the Content-Type
    (415); then the body size (413 above `max_body_bytes`, from Content-Length or counted while reading,
    never buffered past it); then, on the JSON routes, a key given twice in one object (422)."""

    def __init__(self, app, cfg: ServeConfig):
        self.app, self.cfg = app, cfg

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)

        async def reply(status, message):
            for m in _json_error(status, message):
                await send(m)

        headers = {k.decode("latin-1").lower(): v for k, v in scope.get("headers", [])}
        if self.cfg.api_key is not None:
            key = headers.get("x-api-key")
            if key is None:
                return await reply(401, "missing API key: send header `X-API-Key: <key>`")
            if not hmac.compare_digest(key, self.cfg.api_key.encode()):
                return await reply(403, "wrong API key (header X-API-Key)")
        content_type = headers.get("content-type", b"").decode("latin-1").split(";")[0].strip().lower()
        json_route = scope["method"] == "POST" and scope["path"].rstrip("/").endswith(JSON_ROUTES)  # elsewhere: the router's 404 / 405
        if json_route and content_type != "application/json" and not content_type.endswith("+json"):
            # curl -d without -H sends a form, requests.post(data=...) no type (which FastAPI does not read as
            # JSON): say so, rather than "the body must be a JSON object"
            return await reply(
                415, f"Content-Type must be application/json (got {content_type or 'none'}); e.g. curl -H 'Content-Type: application/json'"
            )
        limit = self.cfg.max_body_bytes
        too_big = f"request body larger than {limit} bytes; a /generate request is a small JSON object"
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            return await reply(413 if length.isdigit() else 400, too_big if length.isdigit() else "bad Content-Length")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return await reply(413, too_big)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False
        duplicate = duplicate_json_key(body) if json_route else None
        if duplicate is not None:
            return await reply(422, f"the JSON body gives the key {duplicate!r} twice in one object; give each key once")

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


@dataclass
class ModelInfo:
    styles: list[StyleInfo]
    native_size: tuple[int, int]  # (width, height)
    lora_names: list[str] = field(default_factory=list)  # preloaded LoRA adapters
    sampler: dict = field(default_factory=dict)  # the model's own {"scheduler", "num_inference_steps", "guidance_scale"}
    vae_scale_factor: int = 8  # image pixels per latent cell (SD's 8; a model replica reports its own): the regions' coverage grid

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
        return ModelInfo(
            self.backend.styles(),
            self.backend.native_size,
            list(getattr(self.backend, "lora_names", [])),
            dict(getattr(self.backend, "sampler", {}) or {}),
            int(self.backend.pipe.vae_scale_factor),
        )

    async def generate(self, samples):
        async with self._lock:  # one forward at a time, like one replica
            return await asyncio.to_thread(self.backend.generate, list(samples))


def encode_png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


EXAMPLE_BODY = '{"prompt": "a red circle", "style": 0}'
# The {"error"} bodies of POST routes, for the OpenAPI schema (/docs); FastAPI's own 422 ({"detail": [...]}) is never sent.
POST_ERRORS = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in (
        (400, "malformed JSON body"),
        (401, "missing API key (header X-API-Key)"),
        (403, "wrong API key"),
        (413, "body larger than max_body_bytes"),
        (415, "Content-Type is not application/json"),
        (422, "a field is wrong: the message names it and says what would be right"),
        (503, "overloaded: retry after the Retry-After header's seconds"),
    )
}
# Fields whose type is a union: pydantic reports one error per member; say it once, in words.
UNION_EXPECTED = {
    "prompt": "a string or a list of strings",
    "style": "a style name (string) or index (integer)",
    "weights": "an object {style name: weight} or a list with one number per style",
}


def _malformed_json(detail: str) -> str:
    return f"malformed JSON body ({detail}); send a JSON object like {EXAMPLE_BODY}"


def _unreadable_body_detail(cause: Optional[BaseException]) -> Optional[str]:
    """What made FastAPI's body parsing fail outside the JSON grammar (its 400 "There was an error parsing
    the body" says nothing): None for a cause it does not know."""
    if isinstance(cause, UnicodeDecodeError):
        return f"not UTF-8 text: byte {cause.object[cause.start]:#04x} at offset {cause.start}; JSON is sent as UTF-8"
    if isinstance(cause, RecursionError):
        return "arrays or objects nested too deep"
    if isinstance(cause, ValueError) and "integer string conversion" in str(cause):  # Python's int() digit limit
        return f"a number with more than {sys.get_int_max_str_digits()} digits"
    return None


# what each item of a union field's list (or value of its object) must be
UNION_ITEM = {"prompt": "a string", "weights": "a number"}


def _union_branch(loc: list) -> Optional[int]:
    """Where `loc` (without "body") names a union field followed by pydantic's branch ("weights",
    "list[float]", 0 / "regions", 1, "weights", "dict[str,float]", "neon"): the field's index in `loc`."""
    for i in (0, 2) if loc and loc[0] == "regions" else (0,):
        if len(loc) > i + 1 and str(loc[i]) in UNION_EXPECTED and isinstance(loc[i + 1], str) and not loc[i + 1].isdigit():
            if i == 0 or str(loc[1]).isdigit():
                return i
    return None


def _validation_message(exc: RequestValidationError, model: type = GenerateRequest) -> tuple[int, str]:
    """FastAPI's error list -> (status, one readable line per bad field); `model`: the route's body."""
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return 400, _malformed_json("; ".join(str(e.get("ctx", {}).get("error", e.get("msg"))) for e in errors))
    # pydantic reports a union field once per branch: {"neon": true} fails the object branch at its value and
    # the list branch as a whole, which read as the same line twice (once "got True", once the whole object).
    # Grouped per field: the whole value, and the items a branch refused inside it, for one line.
    unions: dict[tuple, dict] = {}
    lines: list = []
    for e in errors:
        raw = [p for p in e.get("loc", ()) if p != "body"]
        i = _union_branch(raw)
        if i is not None:
            field_loc = tuple(str(p) for p in raw[: i + 1])
            if field_loc not in unions:
                unions[field_loc] = {"whole": [], "items": []}
                lines.append(field_loc)  # rendered below, where the field's first error stood
            if len(raw) == i + 2:
                unions[field_loc]["whole"].append(e.get("input"))
            else:
                item = str(raw[i]) + "".join(f"[{p!r}]" for p in raw[i + 2 :])
                unions[field_loc]["items"].append(f"{item} is {e.get('input')!r}")
            continue
        loc = [str(p) for p in raw]
        name = ".".join(loc)
        if not loc:
            if e.get("type") == "missing":
                lines.append(f"request body is missing; send a JSON object like {EXAMPLE_BODY}")
            else:
                lines.append(f"the body must be a JSON object like {EXAMPLE_BODY} (got {e.get('input')!r})")
        elif e.get("type") == "extra_forbidden" and loc[0] == "regions" and len(loc) == 3:
            lines.append(f"regions[{loc[1]}]: unknown field {loc[2]!r}; allowed fields: {', '.join(RegionRequest.model_fields)}")
        elif e.get("type") == "extra_forbidden":
            lines.append(f"unknown field {name!r}; allowed fields: {', '.join(model.model_fields)}")
        elif loc[0] == "regions" and len(loc) >= 3 and loc[1].isdigit():
            expected = {
                "style": UNION_EXPECTED["style"],
                "weights": UNION_EXPECTED["weights"],
                "box": "[x0, y0, x1, y1], four fractions of the canvas",
            }.get(loc[2])
            detail = f"must be {expected}" if expected else e.get("msg")
            lines.append(f"regions[{loc[1]}]: {loc[2]} {detail} (got {e.get('input')!r})")
        elif e.get("type") == "missing":
            lines.append(f"missing required field {name!r}")
        elif e.get("type") == "finite_number":
            lines.append(f"{name} must be a finite number (got {e.get('input')!r})")
        else:
            lines.append(f"{name}: {e.get('msg')} (got {e.get('input')!r})")
    for n, line in enumerate(lines):
        if isinstance(line, tuple):
            field, group = line[-1], unions[line]
            prefix = f"regions[{line[1]}]: " if line[0] == "regions" else ""
            got = f"got {group['whole'][0]!r}" if group["whole"] else "got"
            if group["items"]:
                got += f": {', '.join(dict.fromkeys(group['items']))}, not {UNION_ITEM[field]}"
            lines[n] = f"{prefix}{field} must be {UNION_EXPECTED[field]} ({got})"
    return 422, "; ".join(dict.fromkeys(lines))


def sampler_config(cfg: ServeConfig, info: ModelInfo) -> ServeConfig:
    """`cfg` with default_steps / default_guidance filled from the model when the config leaves them
    unset: a few-step (LCM) model's 4 steps with CFG off, the paper's 25 / 7 otherwise; and its limits
    resolved against the model (`ServeConfig.limits_for`, a few-step model's training grid)."""
    sampler = info.sampler or {}
    limits = cfg.limits_for(info.native_size)  # unset size limits rise to the model's native size (SDXL: 1024)
    update = {
        "default_steps": cfg.default_steps if cfg.default_steps is not None else int(sampler.get("num_inference_steps", PAPER_STEPS)),
        "default_guidance": cfg.default_guidance if cfg.default_guidance is not None else float(sampler.get("guidance_scale", PAPER_GUIDANCE)),
    }
    most = sampler.get("max_steps")  # a few-step model samples at most its training grid's steps (its scheduler refuses more)
    if most is not None and most < limits.max_steps:
        limits = limits.model_copy(update={"max_steps": int(most)})
    update["limits"] = limits
    return cfg.model_copy(update=update)


def create_api(service: GenerationService, cfg: ServeConfig) -> FastAPI:
    async def model_info(refresh: bool = False) -> ModelInfo:
        info = await service.info(refresh=refresh)
        if cfg.default_size is not None:
            return dataclasses.replace(info, native_size=(cfg.default_size, cfg.default_size))
        return info

    api = FastAPI(
        title="dmm-ray style router",
        description="One merged DMM model serving every style (and mixtures of styles) in shared batches.",
        version="0.1.0",
        docs_url=None,  # GET /docs below: Swagger UI, with a note when its CDN is out of reach
    )

    @api.exception_handler(RequestError)
    async def _request_error(_: Request, exc: RequestError):
        retry_after = getattr(exc, "retry_after_s", None)
        headers = {"Retry-After": str(max(1, math.ceil(retry_after)))} if retry_after is not None else None
        return JSONResponse({"error": exc.message}, status_code=exc.status, headers=headers)

    @api.exception_handler(StyleError)
    async def _style_error(_: Request, exc: StyleError):  # a style the model does not have, however it got here
        return JSONResponse({"error": str(exc)}, status_code=422)

    @api.exception_handler(SampleFailed)
    async def _sample_failed(_: Request, exc: SampleFailed):
        return JSONResponse({"error": exc.message}, status_code=500)

    @api.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):  # logged in full; the client gets no internals
        logger.error("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
        return JSONResponse({"error": "internal error"}, status_code=500)

    @api.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        model = ExportCommandRequest if request.url.path.endswith("/export_command") else GenerateRequest
        status, message = _validation_message(exc, model)
        return JSONResponse({"error": message}, status_code=status)

    @api.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException):  # 404, 405, an unparsable body: the same {"error"} shape
        message = str(exc.detail)
        # a body json.loads refuses other than by its grammar (bad UTF-8, a 5000-digit number, deep nesting): FastAPI
        # raises its bare 400 from the cause; say what it was, as a grammar error's message does
        detail = _unreadable_body_detail(exc.__cause__) if exc.status_code == 400 else None
        if detail is not None:
            message = _malformed_json(detail)
        return JSONResponse({"error": message}, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def playground():
        return HTMLResponse(PLAYGROUND_HTML.read_text())

    @api.get("/docs", include_in_schema=False)
    async def docs(request: Request):
        """FastAPI's Swagger UI page; it loads its script from a CDN, so offline (an air-gapped cluster) it
        would be blank: then it says so and links the schema (GET /openapi.json) instead."""
        openapi_url = request.scope.get("root_path", "").rstrip("/") + api.openapi_url
        page = get_swagger_ui_html(openapi_url=openapi_url, title=f"{api.title} - Swagger UI").body.decode()
        link = html.escape(openapi_url)
        note = (
            '<p style="font-family:sans-serif;margin:2rem">The API docs viewer (Swagger UI) loads from cdn.jsdelivr.net, '
            f'which this browser cannot reach. The API schema is at <a href="{link}">{link}</a>.</p>'
        )
        script = f"if (typeof SwaggerUIBundle === 'undefined') document.getElementById('swagger-ui').innerHTML = {json.dumps(note)};"
        return HTMLResponse(page.replace("</body>", f"<script>{script}</script></body>"))

    @api.get("/healthz")
    async def healthz():
        """Liveness of this router: answers at once, never waits on the model (or behind generation)."""
        return {"status": "ok"}

    # HEAD too (load balancers), as its own route: one route with both methods gives the OpenAPI
    # schema two operations of one id, and FastAPI a "Duplicate Operation ID" warning per /openapi.json
    api.add_api_route("/healthz", healthz, methods=["HEAD"], include_in_schema=False)

    @api.get("/readyz")
    async def readyz():
        """Readiness: the model deployment answers within `readyz_timeout_s` (a cache does not count).
        Says nothing about why not (that is logged): no exception text or paths to unauthenticated clients."""
        try:
            info = await asyncio.wait_for(service.info(refresh=True), timeout=cfg.readyz_timeout_s)
        except Exception as exc:
            logger.warning("readyz: model not ready: %s: %s", type(exc).__name__, exc)
            headers = {"Retry-After": str(max(1, math.ceil(cfg.retry_after_s)))}
            return JSONResponse({"status": "unavailable"}, status_code=503, headers=headers)
        return {"status": "ready", "num_styles": len(info.styles)}

    @api.get("/styles", response_model=StylesResponse)
    async def styles():
        info = await model_info()
        effective = sampler_config(cfg, info)
        return StylesResponse(
            styles=info.styles,
            default_steps=effective.default_steps,
            default_guidance=effective.default_guidance,
            sampler=(info.sampler or {}).get("scheduler", PAPER_SCHEDULER),
            default_negative_prompt=(info.sampler or {}).get("negative_prompt", PAPER_NEGATIVE_PROMPT),
            default_width=info.native_size[0],
            default_height=info.native_size[1],
            limits=effective.limits.model_dump() | {"api_key_required": cfg.api_key is not None},
            lora=info.lora_names,
        )

    @api.post("/export_command", responses=POST_ERRORS)
    async def export_command(req: ExportCommandRequest):
        """The exact `jobs/export.py` command that bakes this style or mixture into a stock checkpoint
        (the playground shows it; the server itself never writes or serves model files)."""
        info = await model_info()
        names = info.style_names
        # the mixture /generate reports for these weights (6 decimals, a weight that rounds to 0 left out): one style
        # left is --style, as a weight of 1e-7 beside it made a "mixture" {"ink": 0.0, "neon": 1.0} of --weights neon=1
        chosen = named_mixture(names, resolve_mixture(names, req.style, req.weights))

        def build() -> str:
            from dmm_ray.export import export_command as build_command

            if len(chosen) == 1:
                return build_command(cfg.model_location(), style=next(iter(chosen)), fmt=req.format)
            return build_command(cfg.model_location(), style_weights=chosen, fmt=req.format, names=names)

        # In a worker thread: the first call imports dmm_ray.export (torch, diffusers: seconds), and on the event
        # loop that held /healthz and every request meanwhile (the playground sends this call as it loads)
        command = await asyncio.to_thread(build)
        return {"command": command, "mixture": chosen}

    async def resolve_off_loop(req: GenerateRequest, info: ModelInfo):
        # In a worker thread: a regions request imports dmm_ray.regions (torch, diffusers: seconds, on the first
        # one) and builds its masks, and on the event loop that held /healthz and every other request meanwhile
        return await asyncio.to_thread(
            resolve_request,
            req,
            info.style_names,
            sampler_config(cfg, info),
            info.native_size,
            info.lora_names,
            vae_scale_factor=info.vae_scale_factor,
        )

    @api.post(
        "/generate",
        response_model=GenerateResponse,
        responses={200: {"content": {"image/png": {}}, "description": "PNG when the request makes one image"}}
        | POST_ERRORS
        | {500: {"model": ErrorResponse, "description": "the model failed on this image (details in the server log)"}},
    )
    async def generate(req: GenerateRequest, x_api_key: Optional[str] = Header(None)):
        # The API key (and the body size) were checked by GuardMiddleware before the body was read;
        # checked again here so the route is safe even if mounted without the middleware.
        if cfg.api_key is not None and not hmac.compare_digest((x_api_key or "").encode(), cfg.api_key.encode()):
            raise RequestError(401 if x_api_key is None else 403, "missing or wrong API key (header X-API-Key)")
        info = await model_info()
        resolved = await resolve_off_loop(req, info)
        try:
            images = await service.generate(resolved.samples)
        except StylesChanged:  # the router's style list is stale (the model was reloaded): read it again, once
            logger.warning("the model's styles changed since this router read them; reading them again")
            info = await model_info(refresh=True)
            resolved = await resolve_off_loop(req, info)
            images = await service.generate(resolved.samples)
        pngs = await asyncio.to_thread(lambda: [encode_png(im) for im in images])
        if resolved.response_format == "png":
            return Response(
                pngs[0],
                media_type="image/png",
                headers={"X-Seed": str(resolved.seed), "X-Style-Mixture": json.dumps(resolved.mixture)}
                # boxes and mixtures only: the prompts (up to max_prompt_chars each) are in the request, and
                # would make a header past proxies' 8-16 KB limits
                | ({"X-Regions": json.dumps([r.model_dump(exclude={"prompt"}) for r in resolved.regions])} if resolved.regions else {})
                | ({"X-LoRA": json.dumps(resolved.lora)} if resolved.lora else {}),
            )
        return GenerateResponse(
            images=[GeneratedImage(prompt=s.prompt, seed=s.seed, png_base64=base64.b64encode(p).decode()) for s, p in zip(resolved.samples, pngs)],
            seed=resolved.seed,
            mixture=resolved.mixture,
            regions=resolved.regions,
            steps=resolved.steps,
            guidance=resolved.guidance,
            width=resolved.width,
            height=resolved.height,
            lora=resolved.lora,
        )

    api.add_middleware(GuardMiddleware, cfg=cfg)
    return api
