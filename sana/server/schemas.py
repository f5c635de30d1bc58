"""The body of an image request, checked field by field, and resolved against the served model and the limits.

`POST /v1/images/generations` and `POST /v1/jobs` take the same JSON object: OpenAI's image fields (`prompt`,
`n`, `size`, `response_format`, `output_format`, `model`) and this server's extensions (`negative_prompt`,
`num_inference_steps`, `guidance_scale`, `seed`, `sampler`, `pag_scale`, and for a server with a ControlNet
`control_image`, base64 image data or a data: URL, and `control_scale`). Types are strict (a JSON number
is not a string, `true` is not 1), numbers must be finite, and `null` means "the default" for every field
but `prompt`.

`POST /v1/images/edits` takes the same fields, plus `strength`, as multipart form fields beside the `image`,
`mask` and `control_image` files (`parse_form`): a form field is text, so numbers and booleans are read from
their text ("2", "0.5", "true") and an empty field means the default.

Fields OpenAI defines that this server does not implement (`quality`, `style`, `user`, `background`,
`moderation`, `output_compression`, `partial_images`) are accepted and ignored, so existing OpenAI clients work
unchanged; any other unknown field is a 400 naming it (a typo such as `num_steps` must not silently fall back
to a default). `stream: true` is refused: progress is what `POST /v1/jobs` and its events are for.

Every mistake raises `RequestError(message, param)`: one line naming the field, answered as a 400 before any
model work. Nothing here touches the file system.
"""

from __future__ import annotations

import base64
import binascii
import random
import re
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

# OpenAI's image fields this server accepts and ignores (see the module docstring).
OPENAI_IGNORED = frozenset(
    {"quality", "style", "user", "background", "moderation", "output_compression", "partial_images"}
)
RESPONSE_FORMATS = ("b64_json", "url")
OUTPUT_FORMATS = ("png", "jpeg", "webp")
SIZE_MULTIPLE = 32
MAX_SEED = 2**63 - 1  # torch's generators take any int64; image i of a request uses seed + i


class RequestError(Exception):
    """A bad request: `message` is one line for the user, `param` the field it is about (None: the body)."""

    def __init__(self, message: str, param: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status


class ImageRequest(BaseModel):
    """The JSON body, type-checked; `resolve` checks the values against the model and the limits."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str
    n: int | None = None
    size: str | None = None
    response_format: Literal["b64_json", "url"] | None = None
    output_format: Literal["png", "jpeg", "webp"] | None = None
    model: str | None = None
    stream: bool | None = None
    negative_prompt: str | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = Field(default=None, allow_inf_nan=False)
    seed: int | None = None
    sampler: str | None = None
    pag_scale: float | None = Field(default=None, allow_inf_nan=False)
    control_image: str | None = None  # base64 image data or a data: URL (an edit sends a file instead)
    control_scale: float | None = Field(default=None, allow_inf_nan=False)


class EditRequest(ImageRequest):
    """The form fields of an image edit: an image request plus the img2img strength (None: the default, 1 with a
    mask and 0.6 without)."""

    strength: float | None = Field(default=None, allow_inf_nan=False)


# How the text of a form field becomes the JSON type ImageRequest checks: field -> "int" | "float" | "bool".
_FORM_TYPES = {
    "n": "int",
    "num_inference_steps": "int",
    "seed": "int",
    "guidance_scale": "float",
    "pag_scale": "float",
    "strength": "float",
    "control_scale": "float",
    "stream": "bool",
}
_INT = re.compile(r"[+-]?\d{1,20}")


@dataclass(frozen=True)
class Limits:
    """What a deployer allows one request: the largest image side in pixels, the most sampling steps and the
    most images."""

    max_side: int = 4096
    max_steps: int = 100
    max_images: int = 8


@dataclass(frozen=True)
class ModelDefaults:
    """What a request that leaves a setting out gets: the served model's native size and sampling settings."""

    name: str
    width: int
    height: int
    steps: int
    guidance_scale: float
    sampler: str
    samplers: tuple[str, ...]


@dataclass(frozen=True)
class Resolved:
    """A request with every default filled in: what the engine needs, and how to answer."""

    prompt: str
    negative_prompt: str
    n: int
    width: int
    height: int
    steps: int
    guidance_scale: float
    sampler: str
    pag_scale: float
    seeds: tuple[int, ...]
    response_format: str
    output_format: str


def parse_body(data: Any) -> ImageRequest:
    """The decoded JSON body as an ImageRequest, or a RequestError naming the first bad field."""
    if not isinstance(data, dict):
        raise RequestError(f"the request body must be a JSON object, got a JSON {_json_type(data)}")
    data = {k: v for k, v in data.items() if k not in OPENAI_IGNORED}
    try:
        return ImageRequest.model_validate(data)
    except ValidationError as e:
        raise _request_error(e) from None


def parse_form(fields: dict[str, str]) -> EditRequest:
    """The text fields of a multipart edit request as an EditRequest (RequestError naming the first bad one)."""
    data: dict[str, Any] = {}
    for name, text in fields.items():
        if name in OPENAI_IGNORED:
            continue
        kind = _FORM_TYPES.get(name)
        if kind is None or text is None:
            data[name] = text
        elif text.strip() == "":
            data[name] = None  # an empty field: the default
        elif kind == "int":
            if not _INT.fullmatch(text.strip()):
                raise RequestError(f"{name} must be an integer, got {text!r}", name)
            data[name] = int(text)
        elif kind == "float":
            try:
                data[name] = float(text)
            except ValueError:
                raise RequestError(f"{name} must be a number, got {text!r}", name) from None
        else:
            if text.strip().lower() not in ("true", "false"):
                raise RequestError(f"{name} must be true or false, got {text!r}", name)
            data[name] = text.strip().lower() == "true"
    try:
        return EditRequest.model_validate(data)
    except ValidationError as e:
        raise _request_error(e) from None


def resolve_strength(request: EditRequest, has_mask: bool) -> float:
    """The edit's strength: as given, in (0, 1]; by default 1 with a mask (repaint it wholly) and
    sana.generation.IMG2IMG_STRENGTH without one."""
    from sana.generation import IMG2IMG_STRENGTH

    if request.strength is None:
        return 1.0 if has_mask else IMG2IMG_STRENGTH
    if not 0 < request.strength <= 1:
        raise RequestError(f"strength must be in (0, 1], got {request.strength}", "strength")
    return float(request.strength)


def resolve_control_scale(request: ImageRequest, has_control_image: bool) -> float:
    """The ControlNet's scale: as given (any finite number; 0 adds nothing), 1 by default. A scale without a
    control image is a mistake (it would silently steer nothing)."""
    if request.control_scale is not None and not has_control_image:
        raise RequestError("control_scale needs a control_image to steer with", "control_scale")
    return 1.0 if request.control_scale is None else float(request.control_scale)


_DATA_URL = re.compile(r"data:([^,]*),(.*)", re.DOTALL)


def decode_base64_image(text: str, name: str) -> bytes:
    """The file bytes in a JSON image field: base64 (line breaks allowed) or a `data:` URL with base64 data.
    RequestError naming the field when it is neither; whether the bytes are an image is the decoder's check."""
    match = _DATA_URL.fullmatch(text.strip())
    if match:
        if not match[1].lower().endswith(";base64"):
            raise RequestError(f"{name}: a data: URL must carry base64 data (data:image/png;base64,...)", name)
        text = match[2]
    data = "".join(text.split())
    if not data:
        raise RequestError(f"{name} is empty: send a base64 PNG or JPEG file, or a data: URL", name)
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"{name} is not base64 data: send a base64 PNG or JPEG file, or a data: URL",
                           name) from None  # fmt: skip


def resolve(request: ImageRequest, model: ModelDefaults, limits: Limits) -> Resolved:
    """Fill in the defaults and check every value against the model and the limits (RequestError)."""
    if request.stream:
        raise RequestError(
            "stream: streaming is not supported here; use POST /v1/jobs and follow its events", "stream"
        )
    if request.model is not None and request.model != model.name:
        raise RequestError(
            f"model: {request.model!r} is not served here; this server serves {model.name!r}", "model"
        )
    n = 1 if request.n is None else request.n
    if not 1 <= n <= limits.max_images:
        raise RequestError(f"n must be between 1 and {limits.max_images}, got {n}", "n")
    width, height = parse_size(request.size, model, limits.max_side)
    steps = model.steps if request.num_inference_steps is None else request.num_inference_steps
    if not 1 <= steps <= limits.max_steps:
        raise RequestError(
            f"num_inference_steps must be between 1 and {limits.max_steps}, got {steps}", "num_inference_steps"
        )
    sampler = model.sampler if request.sampler is None else request.sampler
    if sampler not in model.samplers:
        raise RequestError(f"sampler must be one of {', '.join(model.samplers)}, got {sampler!r}", "sampler")
    pag_scale = 0.0 if request.pag_scale is None else float(request.pag_scale)
    if pag_scale < 0:
        raise RequestError(f"pag_scale must be >= 0, got {pag_scale}", "pag_scale")
    guidance = model.guidance_scale if request.guidance_scale is None else float(request.guidance_scale)
    first = random.randrange(2**31) if request.seed is None else request.seed
    if first < 0 or first + n - 1 > MAX_SEED:
        raise RequestError(f"seed must be between 0 and {MAX_SEED - n + 1} for {n} image(s), got {first}", "seed")
    return Resolved(
        prompt=request.prompt,
        negative_prompt=request.negative_prompt or "",
        n=n,
        width=width,
        height=height,
        steps=steps,
        guidance_scale=guidance,
        sampler=sampler,
        pag_scale=pag_scale,
        seeds=tuple(first + i for i in range(n)),
        response_format=request.response_format or "b64_json",
        output_format=request.output_format or "png",
    )


_SIZE = re.compile(r"(\d{1,9})x(\d{1,9})")


def parse_size(size: str | None, model: ModelDefaults, max_side: int) -> tuple[int, int]:
    """(width, height) from "WxH" (OpenAI's order); None or "auto" is the model's native size."""
    if size is None or size == "auto":
        return model.width, model.height
    match = _SIZE.fullmatch(size)
    if match is None:
        raise RequestError(
            f'size must be "WIDTHxHEIGHT" in pixels (e.g. "1024x768") or "auto", got {size!r}', "size"
        )
    width, height = int(match[1]), int(match[2])
    if width <= 0 or height <= 0:
        raise RequestError(f"size {size}: width and height must be positive", "size")
    if max(width, height) > max_side:
        raise RequestError(f"size {size}: the largest side allowed is {max_side} pixels", "size")
    if width % SIZE_MULTIPLE or height % SIZE_MULTIPLE:
        raise RequestError(f"size {size}: width and height must be multiples of {SIZE_MULTIPLE}", "size")
    return width, height


def _request_error(error: ValidationError) -> RequestError:
    """One line about the first error pydantic found, naming its field."""
    first = error.errors(include_url=False)[0]
    loc = [str(part) for part in first["loc"]]
    field = loc[0] if loc else None
    where = ".".join(loc) or "body"
    kind = first["type"]
    if kind == "extra_forbidden":
        return RequestError(f"unknown field {where!r}", field)
    if kind == "missing":
        return RequestError(f"{where} is required", field)
    if kind == "finite_number":
        return RequestError(f"{where} must be a finite number, got {first.get('input')!r}", field)
    message = first["msg"]
    message = message[0].lower() + message[1:] if message else "is invalid"
    value = first.get("input")
    shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
    if kind.endswith("_type") and value is not None:
        shown = f"{shown} (a JSON {_json_type(value)})"
    return RequestError(f"{where}: {message}, got {shown}", field)


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"
