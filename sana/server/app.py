"""The HTTP application of `sana serve`: an OpenAI-compatible image API, jobs with live events, metrics.

`create_app(pipe, model_name=..., ...)` builds a FastAPI app around one `SanaPipeline` and one batching
`Engine` (sana/server/engine.py). Nothing lives at module level: the engine, the settings and a Prometheus
registry of its own hang on `app.state`, so several apps can live in one process (the tests do). The lifespan
starts the engine's worker and, at shutdown (SIGTERM or Ctrl-C, after uvicorn has stopped accepting
connections and finished the open ones), stops it with `drain=True`: queued and running work finishes, new
submissions get a 503.

Routes (see docs/serving.md):
    GET  /health                   200 {"status": "ok"} once the model is loaded (never needs the key)
    GET  /v1/models                the served model, OpenAI's list shape
    POST /v1/images/generations    OpenAI's image generation; waits for the images. A client that goes away
                                   cancels its job. With a ControlNet served, `control_image` (base64) and
                                   `control_scale` steer it.
    POST /v1/images/edits          OpenAI's image edit (multipart: image, optional mask and control_image, the
                                   generation fields and `strength`): img2img, or inpainting with a mask;
                                   waits as above
    POST /v1/jobs                  the same body; 202 with the job's id and URLs, at once
    GET  /v1/jobs/{id}             the job's state (and image URLs once done)
    GET  /v1/jobs/{id}/events      Server-Sent Events: queued (position), running, progress, done | error |
                                   cancelled
    DELETE /v1/jobs/{id}           cancel
    GET  /v1/images/{name}         a generated image (kept `keep_seconds`, in memory)
    GET  /v1/config                the model's defaults and the limits, for the page (never needs the key)
    GET  /metrics                  Prometheus text
    GET  /, /static/...            the web page (never need the key; the page sends it)

Errors are OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with one-line messages: 400 for a
bad field (FastAPI's 422 is not used), 401 without the API key, 404, 405, 413 for a body over the limit, 429
with `Retry-After` when the queue is full, 503 while shutting down, 500 for a failure of ours.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import math
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import FormParser, MultiPartException, MultiPartParser

from sana.errors import UserError, one_line
from sana.server.engine import BatchKey, Engine, ImageSpec, Job, QueueFull, ShuttingDown
from sana.server.schemas import (
    ImageRequest,
    Limits,
    ModelDefaults,
    RequestError,
    Resolved,
    decode_base64_image,
    parse_body,
    parse_form,
    resolve,
    resolve_control_scale,
    resolve_strength,
)

if TYPE_CHECKING:
    from PIL import Image

    from sana.pipeline import SanaPipeline

STATIC_DIR = Path(__file__).parent / "static"
OPEN_PATHS = ("/health", "/v1/config", "/")  # no API key needed; nor for anything under /static/
DEFAULT_MAX_BODY_BYTES = 1 << 20
DEFAULT_MAX_UPLOAD_BYTES = 16 << 20  # an edit's body: its image and mask files
GENERATIONS_PATH = "/v1/images/generations"
EDITS_PATH = "/v1/images/edits"
JOBS_PATH = "/v1/jobs"
DISCONNECT_POLL_SECONDS = 0.25
KEEPALIVE_SECONDS = 15.0

access_log = logging.getLogger("sana.server.access")
log = logging.getLogger("sana.server")

# error kind -> (OpenAI error type, metrics kind)
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    499: "invalid_request_error",
    500: "server_error",
    503: "service_unavailable",
}


class ApiError(Exception):
    """An answer in OpenAI's error shape. kind: the label counted in sana_errors_total."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        kind: str,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind
        self.code, self.headers = code, headers


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {
        "error": {
            "message": one_line(message),
            "type": _ERROR_TYPES.get(status, "invalid_request_error"),
            "param": param,
            "code": code,
        }
    }


class Metrics:
    """The app's Prometheus metrics, in a registry of its own (never the process-global one)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.queue_depth = Gauge("sana_queue_depth", "Images waiting in the queue (not yet running)", registry=r)
        self.batch_size = Histogram(
            "sana_batch_size", "Images per pipeline call", buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32, 64), registry=r
        )
        self.batch_seconds = Histogram(
            "sana_batch_seconds",
            "Seconds per pipeline call",
            buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
            registry=r,
        )
        self.request_seconds = Histogram(
            "sana_request_seconds",
            "Seconds from request to response (to the end of the body), by route",
            ["route", "method"],
            buckets=(0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
            registry=r,
        )
        self.requests = Counter(
            "sana_requests", "HTTP requests answered, by route and status", ["route", "status"], registry=r
        )
        self.images = Counter("sana_images", "Images the pipeline generated", registry=r)
        self.errors = Counter("sana_errors", "Errors, by kind", ["kind"], registry=r)
        for kind in ("validation", "auth", "not_found", "method_not_allowed", "too_large", "queue_full",
                     "shutting_down", "disconnected", "generation", "internal"):  # fmt: skip
            self.errors.labels(kind)  # present at 0 from the start

    def on_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_seconds.observe(seconds)
        self.images.inc(size)


def create_app(
    pipe: SanaPipeline,
    *,
    model_name: str,
    max_batch: int = 8,
    max_queue: int = 64,
    api_key: str | None = None,
    max_side: int = 4096,
    max_steps: int = 100,
    max_images: int = 8,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    keep_seconds: float = 3600.0,
    drain_timeout: float | None = None,
    torch_threads: int | None = None,
) -> FastAPI:
    """The app serving `pipe` as `model_name`. max_images is capped by max_queue (a job never splits across
    the queue). max_upload_bytes: the body limit of a request carrying images (an edit's files; with a
    ControlNet, a generation's or job's base64 control image too), max_body_bytes that of every other request
    (never less). drain_timeout: seconds the shutdown waits for queued and running work (None: all of it).
    torch_threads: the engine worker's torch threads (sana.server.engine.cpu_threads_for_worker)."""
    from sana.samplers import SAMPLERS

    limits = Limits(max_side=max_side, max_steps=max_steps, max_images=min(max_images, max_queue))
    scheduler = pipe.scheduler
    defaults = ModelDefaults(
        name=model_name,
        width=pipe.default_size,
        height=pipe.default_size,
        steps=scheduler.steps,
        guidance_scale=float(scheduler.guidance_scale),
        sampler=scheduler.sampler,
        samplers=tuple(SAMPLERS),
    )
    if defaults.steps > limits.max_steps:
        raise UserError(f"--max-steps {max_steps} is below the model's default of {defaults.steps} steps")
    if defaults.width > limits.max_side:
        raise UserError(f"--max-side {max_side} is below the model's native size {defaults.width}")
    if min(max_body_bytes, max_upload_bytes) < 1024:
        raise UserError(
            f"the body limits must be at least 1024 bytes, got {max_body_bytes} and {max_upload_bytes}"
        )

    metrics = Metrics()
    engine = Engine(
        pipe,
        max_batch=max_batch,
        max_queue=max_queue,
        keep_seconds=keep_seconds,
        on_batch=metrics.on_batch,
        torch_threads=torch_threads,
    )
    metrics.queue_depth.set_function(lambda: engine.queue_depth)
    key = api_key.encode() if api_key else None
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            log.info("shutting down: finishing the queued and running work")
            await asyncio.to_thread(engine.stop, drain=True, timeout=drain_timeout)

    app = FastAPI(
        title="sana serve",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.engine = engine
    app.state.metrics = metrics
    app.state.limits = limits
    app.state.defaults = defaults
    app.state.pipe = pipe

    # ------------------------------------------------------------------------------------------ errors

    def answer(error: ApiError) -> JSONResponse:
        metrics.errors.labels(error.kind).inc()
        return JSONResponse(
            error_body(error.status, error.message, error.param, error.code), error.status, headers=error.headers
        )

    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, error: ApiError) -> JSONResponse:
        return answer(error)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "path", "query")]
        param = loc[-1] if loc else None
        return answer(
            ApiError(400, f"{param or 'request'}: {first.get('msg', 'invalid')}", param=param, kind="validation")
        )

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        if error.status_code == 404:
            message, kind = f"no such route: {request.method} {request.url.path}", "not_found"
        elif error.status_code == 405:
            message, kind = f"method {request.method} is not allowed on {request.url.path}", "method_not_allowed"
        else:
            message, kind = str(error.detail), "validation"
        return answer(ApiError(error.status_code, message, kind=kind, headers=dict(error.headers or {})))

    @app.exception_handler(Exception)
    async def on_internal_error(request: Request, error: Exception) -> JSONResponse:
        log.exception("internal error on %s %s", request.method, request.url.path)
        return answer(ApiError(500, f"internal server error: {type(error).__name__}", kind="internal"))

    # ---------------------------------------------------------------------------- gate and access log

    # A server with a ControlNet takes control images inside JSON bodies (base64): those routes may take bodies
    # as large as an edit's.
    controlled = pipe.controlnet is not None
    json_limit = max(max_body_bytes, max_upload_bytes) if controlled else max_body_bytes
    limits_by_path = {EDITS_PATH: max_upload_bytes, GENERATIONS_PATH: json_limit, JOBS_PATH: json_limit}
    app.add_middleware(Gate, key=key, max_body_bytes=max_body_bytes, path_limits=limits_by_path, metrics=metrics)

    # ---------------------------------------------------------------------------------------- helpers

    def plan(work: Resolved, edit: EditInput | None, control: ControlInput | None) -> None:
        """The engine's pipeline call for this request, checked without model work (UserError): the images
        are read and fitted, so call it off the event loop."""
        pipe.plan(
            [work.prompt] * work.n,
            negative_prompt=work.negative_prompt,
            seed=list(work.seeds),
            **batch_key(work, edit, control).settings(),
            images_per_prompt=1,
            **({} if edit is None else {"image": edit.image, "mask_image": edit.mask}),
            **({} if control is None else {"control_image": control.image}),
        )

    async def read_request(request: Request) -> tuple[Resolved, ControlInput | None]:
        """A generation's JSON body, resolved, its control image (if any) decoded, and planned."""
        data = await read_json(request, json_limit)
        try:
            fields = parse_body(data)
            work = resolve(fields, defaults, limits)
            control = None
            if fields.control_image is not None or fields.control_scale is not None:
                control = await asyncio.to_thread(read_json_control, fields, controlled)
            if control is None:
                plan(work, None, None)  # text only: quick, on the loop
            else:
                await asyncio.to_thread(plan, work, None, control)
        except RequestError as e:
            raise ApiError(e.status, e.message, param=e.param, kind="validation") from None
        except UserError as e:
            raise ApiError(400, str(e), kind="validation") from None
        return work, control

    async def read_edit(request: Request) -> tuple[Resolved, EditInput, ControlInput | None]:
        """An edit's form, checked as a generation's body is, its image, mask and control image decoded and
        planned (off the event loop: decoding and fitting an image takes a while)."""
        form = await read_form(request, max_upload_bytes)
        try:
            files, fields = split_form(form)
            request_fields = parse_form(fields)
            work = resolve(request_fields, defaults, limits)
            edit = await asyncio.to_thread(read_edit_images, files, request_fields)
            control = await asyncio.to_thread(read_form_control, files, request_fields, controlled)
            await asyncio.to_thread(plan, work, edit, control)
        except RequestError as e:
            raise ApiError(e.status, e.message, param=e.param, kind="validation") from None
        except UserError as e:
            raise ApiError(400, str(e), kind="validation") from None
        finally:
            await form.close()
        return work, edit, control

    def submit(work: Resolved, edit: EditInput | None = None, control: ControlInput | None = None) -> Job:
        key = batch_key(work, edit, control)
        image, mask = (edit.image, edit.mask) if edit else (None, None)
        steer = control.image if control else None
        specs = [ImageSpec(work.prompt, work.negative_prompt, seed, image, mask, steer) for seed in work.seeds]
        try:
            return engine.submit(key, specs, work.output_format)
        except QueueFull as e:
            seconds = max(1, math.ceil(e.retry_after))
            raise ApiError(
                429,
                f"the queue is full; retry in {seconds} s",
                kind="queue_full",
                code="queue_full",
                headers={"Retry-After": str(seconds)},
            ) from None
        except ShuttingDown:
            raise ApiError(503, "the server is shutting down", kind="shutting_down") from None

    def image_url(request: Request, name: str) -> str:
        return str(request.url_for("image", name=name))

    def job_or_404(job_id: str) -> Job:
        job = engine.get(job_id)
        if job is None:
            raise ApiError(404, f"no such job: {job_id} (unknown or expired)", param="id", kind="not_found")
        return job

    def job_state(request: Request, job: Job) -> dict[str, Any]:
        state: dict[str, Any] = {
            "id": job.id,
            "object": "job",
            "status": job.status,
            "created": int(job.created),
            "n": len(job.images),
            "seeds": [spec.seed for spec in job.images],
            "position": job.position,
            "step": job.step,
            "steps": job.steps,
            "url": str(request.url_for("job", job_id=job.id)),
            "events_url": str(request.url_for("job_events", job_id=job.id)),
        }
        if job.status == "done":
            state["images"] = [image_url(request, name) for name in job.image_names]
        if job.status == "error":
            state["error"] = job.error
        return state

    # ----------------------------------------------------------------------------------------- routes

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    def model_card() -> dict[str, Any]:
        return {"id": model_name, "object": "model", "created": started, "owned_by": "sana"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        if model_id != model_name:
            raise ApiError(404, f"no such model: {model_id}; this server serves {model_name}", param="model",
                           kind="not_found", code="model_not_found")  # fmt: skip
        return model_card()

    @app.get("/v1/config")
    async def config() -> dict[str, Any]:
        return {
            "model": model_name,
            "width": defaults.width,
            "height": defaults.height,
            "steps": defaults.steps,
            "guidance_scale": defaults.guidance_scale,
            "sampler": defaults.sampler,
            "samplers": list(defaults.samplers),
            "limits": {
                "max_side": limits.max_side,
                "max_steps": limits.max_steps,
                "max_images": limits.max_images,
            },
            "auth": key is not None,
            "controlnet": controlled,
        }

    @app.post(GENERATIONS_PATH)
    async def generations(request: Request) -> Response:
        work, control = await read_request(request)
        return await images_answer(request, work, submit(work, control=control))

    @app.post(EDITS_PATH)
    async def edits(request: Request) -> Response:
        work, edit, control = await read_edit(request)
        return await images_answer(request, work, submit(work, edit, control))

    async def images_answer(request: Request, work: Resolved, job: Job) -> Response:
        """OpenAI's answer to a synchronous image request, once its job is done."""
        waiting = asyncio.ensure_future(job.wait())
        try:
            while True:
                done, _ = await asyncio.wait({waiting}, timeout=DISCONNECT_POLL_SECONDS)
                if done:
                    break
                if await request.is_disconnected():
                    job.cancel()
                    metrics.errors.labels("disconnected").inc()
                    access_log.info("client went away: cancelled job %s", job.id)
                    return Response(status_code=499)
        finally:
            if not waiting.done():
                waiting.cancel()
                job.cancel()  # this handler was cancelled (the server is stopping hard): so is the job
        if job.status == "error":
            raise ApiError(500, f"generation failed: {job.error}", kind="generation")
        if job.status != "done":
            raise ApiError(503, f"the job was {job.status}", kind="shutting_down")
        data = []
        for name, spec in zip(job.image_names, job.images, strict=True):
            if work.response_format == "url":
                data.append({"url": image_url(request, name), "seed": spec.seed})
                continue
            stored = engine.image(name)
            if stored is None:
                raise ApiError(500, "the image expired before it was sent; raise --keep-seconds", kind="internal")
            data.append({"b64_json": base64.b64encode(stored[0]).decode("ascii"), "seed": spec.seed})
        if work.response_format != "url":
            engine.release(job)  # the images are in the response: nobody can ask for them again
        return JSONResponse({"created": int(time.time()), "data": data})

    @app.post(JOBS_PATH, status_code=202)
    async def create_job(request: Request) -> JSONResponse:
        work, control = await read_request(request)
        job = submit(work, control=control)
        return JSONResponse(job_state(request, job), status_code=202)

    @app.get("/v1/jobs/{job_id}", name="job")
    async def get_job(request: Request, job_id: str) -> dict[str, Any]:
        return job_state(request, job_or_404(job_id))

    @app.delete("/v1/jobs/{job_id}")
    async def cancel_job(request: Request, job_id: str) -> dict[str, Any]:
        job = job_or_404(job_id)
        job.cancel()
        return job_state(request, job)

    @app.get("/v1/jobs/{job_id}/events", name="job_events")
    async def job_events(request: Request, job_id: str) -> StreamingResponse:
        job = job_or_404(job_id)
        seeds = [spec.seed for spec in job.images]

        async def stream() -> AsyncIterator[str]:
            async for event in with_keepalive(job.events(), KEEPALIVE_SECONDS):
                if event is None:
                    yield ": keepalive\n\n"
                    continue
                if event["type"] == "done":
                    event = {**event, "images": [image_url(request, n) for n in event["images"]], "seeds": seeds}
                yield f"event: {event['type']}\ndata: {json.dumps(event)}\n\n"

        return StreamingResponse(
            stream(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @app.get("/v1/images/{name}", name="image")
    async def image(request: Request, name: str) -> Response:
        if name in ("generations", "edits"):  # GET on a POST route's path, not an image
            raise ApiError(405, f"method {request.method} is not allowed on {request.url.path}",
                           kind="method_not_allowed", headers={"Allow": "POST"})  # fmt: skip
        stored = engine.image(name)
        if stored is None:
            raise ApiError(404, f"no such image: {name} (unknown or expired)", param="name", kind="not_found")
        data, media_type = stored
        return Response(data, media_type=media_type, headers={"Cache-Control": "private, max-age=3600"})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/")
    async def index() -> Response:
        page = STATIC_DIR / "index.html"
        if not page.is_file():
            raise ApiError(404, "this build has no web page", kind="not_found")
        return FileResponse(page, media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR, check_dir=False), name="static")
    return app


async def read_json(request: Request, limit: int) -> Any:
    """The request's body as JSON, read up to `limit` bytes (413 beyond, whatever Content-Length said)."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"the request body is larger than {limit} bytes", kind="too_large")
        chunks.append(chunk)
    body = b"".join(chunks)
    if not body.strip():
        raise ApiError(400, "the request body is empty; send a JSON object", kind="validation")
    try:
        return json.loads(body)
    except UnicodeDecodeError:
        raise ApiError(400, "the request body is not UTF-8 text", kind="validation") from None
    except json.JSONDecodeError as e:
        raise ApiError(
            400,
            f"the request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}",
            kind="validation",
        ) from None
    except RecursionError:
        raise ApiError(400, "the request body is nested too deeply", kind="validation") from None


async def with_keepalive(events: AsyncIterator[dict], seconds: float) -> AsyncIterator[dict | None]:
    """The events, with a None whenever `seconds` pass without one (an SSE comment keeps proxies from closing
    an idle stream). Never cancels a pending read of `events`, which would end it."""
    iterator = aiter(events)
    pending: asyncio.Future | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(iterator))
            done, _ = await asyncio.wait({pending}, timeout=seconds)
            if not done:
                yield None
                continue
            try:
                event = pending.result()
            except StopAsyncIteration:
                return
            pending = None
            yield event
    finally:
        if pending is not None and not pending.done():
            pending.cancel()
            await asyncio.gather(pending, return_exceptions=True)
        await iterator.aclose()


@dataclass(frozen=True)
class EditInput:
    """An edit's decoded input image, its mask (None: repaint everywhere) and strength."""

    image: Image.Image
    mask: Image.Image | None
    strength: float


@dataclass(frozen=True)
class ControlInput:
    """A request's decoded control image and its ControlNet scale."""

    image: Image.Image
    scale: float


def batch_key(work: Resolved, edit: EditInput | None = None, control: ControlInput | None = None) -> BatchKey:
    """What a request's images share with others in a batch. Each image brings its own input and control image;
    the strength and the control scale are one number per pipeline call."""
    shared = (work.height, work.width, work.steps, work.sampler, work.guidance_scale, work.pag_scale)
    image = {} if edit is None else {"strength": edit.strength, "edit": True}
    steer = {} if control is None else {"control_scale": control.scale, "control": True}
    return BatchKey(*shared, **image, **steer)


FILE_FIELDS = ("image", "image[]", "mask", "control_image")


def split_form(form) -> tuple[dict[str, list[UploadFile]], dict[str, str]]:
    """(files by field, text fields) of an edit's form; RequestError for a file where text belongs, text where
    a file belongs, or a text field given twice."""
    files: dict[str, list[UploadFile]] = {}
    fields: dict[str, str] = {}
    for name, value in form.multi_items():
        if isinstance(value, UploadFile):
            if name not in FILE_FIELDS:
                raise RequestError(f"{name} must be a text field, not a file", name)
            files.setdefault(name.removesuffix("[]"), []).append(value)
        elif name in FILE_FIELDS:
            raise RequestError(f"{name.removesuffix('[]')} must be an image file upload, not a text field",
                               name.removesuffix("[]"))  # fmt: skip
        elif name in fields:
            raise RequestError(f"{name} is given twice", name)
        else:
            fields[name] = value
    return files, fields


def read_edit_images(files: dict[str, list[UploadFile]], request: Any) -> EditInput:
    """The edit's image and mask decoded (RequestError naming the field when missing, repeated or not an
    image). Without a mask, an image with transparent pixels is repainted there (OpenAI's rule)."""
    from sana.image_input import has_transparency, open_image

    decoded = {}
    for name in ("image", "mask"):
        uploads = files.get(name, [])
        if len(uploads) > 1:
            raise RequestError(f"{name}: send one file; this server edits one image per request", name)
        if not uploads:
            if name == "image":
                raise RequestError("image is required: the picture to edit, as a file upload", "image")
            decoded[name] = None
            continue
        try:
            decoded[name] = open_image(uploads[0].file.read(), name)
        except UserError as e:
            raise RequestError(str(e), name) from None
    image, mask = decoded["image"], decoded["mask"]
    if mask is None and has_transparency(image):
        mask = image
    return EditInput(image, mask, resolve_strength(request, mask is not None))


def read_control(data: bytes | None, request: ImageRequest, controlled: bool) -> ControlInput | None:
    """A control image's file bytes decoded, with the request's control scale (None without a control image);
    RequestErrors naming the field for a server without a ControlNet, an image that cannot be decoded, or a
    scale without an image."""
    from sana.image_input import open_image

    if data is not None and not controlled:
        raise RequestError(
            "control_image: this server has no ControlNet (start it with `sana serve --controlnet PATH`, or "
            "serve a model folder that has a controlnet/)",
            "control_image",
        )
    scale = resolve_control_scale(request, data is not None)
    if data is None:
        return None
    try:
        image = open_image(data, "control image")
    except UserError as e:
        raise RequestError(str(e), "control_image") from None
    return ControlInput(image, scale)


def read_json_control(request: ImageRequest, controlled: bool) -> ControlInput | None:
    """The control image of a JSON body (base64 or a data: URL), see read_control."""
    text = request.control_image
    data = None if text is None else decode_base64_image(text, "control_image")
    return read_control(data, request, controlled)


def read_form_control(
    files: dict[str, list[UploadFile]], request: ImageRequest, controlled: bool
) -> ControlInput | None:
    """The control image file of an edit's form, see read_control."""
    uploads = files.get("control_image", [])
    if len(uploads) > 1:
        raise RequestError("control_image: send one file; this server uses one control image per request",
                           "control_image")  # fmt: skip
    return read_control(uploads[0].file.read() if uploads else None, request, controlled)


async def read_form(request: Request, limit: int):
    """The request's form, read up to `limit` bytes (413 beyond, whatever Content-Length said): multipart, or
    URL-encoded (which cannot carry the image: the edit's check then says so, naming the field)."""
    content_type = request.headers.get("content-type", "").lower()
    multipart = content_type.startswith("multipart/form-data")
    if not multipart and not content_type.startswith("application/x-www-form-urlencoded"):
        raise ApiError(
            400,
            "an edit is sent as multipart/form-data: the image (and mask) as files, the other fields as text",
            kind="validation",
        )

    async def limited() -> AsyncIterator[bytes]:
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"the request body is larger than {limit} bytes", kind="too_large")
            yield chunk

    if not multipart:
        return await FormParser(request.headers, limited()).parse()
    parser = MultiPartParser(request.headers, limited(), max_files=4, max_fields=64, max_part_size=64 << 10)
    try:
        return await parser.parse()
    except MultiPartException as e:
        raise ApiError(400, f"the multipart body cannot be read: {e.message}", kind="validation") from None


class Gate:
    """Pure ASGI middleware: the API key, the Content-Length limit (path_limits[path], else max_body_bytes), the
    access log and the latency metrics.

    With a key, every path but /health, /v1/config, / and /static/... needs `Authorization: Bearer KEY`
    (compared in constant time). The access log line, one per request on logger "sana.server.access":
    `CLIENT "METHOD PATH" STATUS SECONDS`.
    """

    def __init__(
        self, app, *, key: bytes | None, max_body_bytes: int, path_limits: dict[str, int], metrics: Metrics
    ) -> None:
        self.app, self.key, self.max_body_bytes, self.metrics = app, key, max_body_bytes, metrics
        self.path_limits = path_limits

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = [0]

        async def send_status(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            error = self.refuse(scope)
            if error is not None:
                self.metrics.errors.labels(error.kind).inc()
                headers = dict(error.headers or {})
                response = JSONResponse(error_body(error.status, error.message, error.param, error.code),
                                        error.status, headers=headers)  # fmt: skip
                await response(scope, receive, send_status)
                return
            await self.app(scope, receive, send_status)
        finally:
            seconds = time.perf_counter() - start
            route = getattr(scope.get("route"), "path", None) or ("/static" if scope["path"].startswith("/static/")
                                                                  else "unmatched")  # fmt: skip
            code = status[0] or 500
            self.metrics.request_seconds.labels(route, scope["method"]).observe(seconds)
            self.metrics.requests.labels(route, str(code)).inc()
            client = scope.get("client")
            query = f"?{scope['query_string'].decode('latin-1')}" if scope.get("query_string") else ""
            access_log.info(
                '%s "%s %s%s" %d %.3fs',
                f"{client[0]}:{client[1]}" if client else "-",
                scope["method"],
                scope["path"],
                query,
                code,
                seconds,
            )

    def refuse(self, scope) -> ApiError | None:
        headers = {k.lower(): v for k, v in scope.get("headers", ())}
        path = scope["path"]
        if self.key is not None and path not in OPEN_PATHS and not path.startswith("/static/"):
            given = headers.get(b"authorization", b"")
            scheme, _, token = given.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
                return ApiError(
                    401,
                    "a valid API key is required: send the header `Authorization: Bearer KEY`",
                    kind="auth",
                    code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"},
                )
        length = headers.get(b"content-length")
        limit = self.path_limits.get(path, self.max_body_bytes)
        if length is not None:
            try:
                size = int(length)
            except ValueError:
                return ApiError(400, "Content-Length is not a number", kind="validation")
            if size > limit:
                return ApiError(413, f"the request body is larger than {limit} bytes", kind="too_large")
        return None
