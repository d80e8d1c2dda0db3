"""OpenAI's image-generation wire format: the request model, the response body and the error shape.

Request fields are OpenAI's (``model``, ``prompt``, ``n``, ``size``, ``response_format``, ``output_format``,
``output_compression``, ``user``, ``safety_identifier``, ``quality``, ``style``, ``background``, ``moderation``,
``stream``, ``partial_images``) plus the diffusion fields peers accept (``seed``, ``num_inference_steps``,
``guidance_scale``, ``negative_prompt``) and ``lora`` (per-request adapters, ``dtc serve --lora-dir``). Any other
field is refused with 400 naming it.

The field rule (docs/serving.md): a value is *accepted* where it means something here, *accepted and ignored*
where it asks for nothing this server would do differently (``quality: "auto"``, ``moderation``: no moderation
runs here, ``user``), and *refused* with 400 naming the field where it asks for something the server cannot do
(``quality: "hd"``, ``style``, ``background: "transparent"``): never a silent substitute.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

#: output_format -> (PIL format name, MIME type)
OUTPUT_FORMATS = {"png": ("PNG", "image/png"), "jpeg": ("JPEG", "image/jpeg"), "webp": ("WEBP", "image/webp")}
SIZE_RE = re.compile(r"^([1-9][0-9]{0,4})x([1-9][0-9]{0,4})$")

# OpenAI's error "type" and "code" by HTTP status, where a handler does not name its own.
ERROR_KINDS = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    408: ("invalid_request_error", "request_timeout"),
    410: ("invalid_request_error", "gone"),
    413: ("invalid_request_error", "request_too_large"),
    429: ("requests", "rate_limit_exceeded"),
    500: ("server_error", "internal_error"),
    503: ("server_error", "service_unavailable"),
    504: ("server_error", "timeout"),
}


class APIError(Exception):
    """An error answered with OpenAI's body: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        kind, default_code = ERROR_KINDS.get(status, ("server_error", None))
        self.status = status
        self.message = message
        self.param = param
        self.type = kind
        self.code = code or default_code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class LoraItem(BaseModel):
    """One adapter of a request's ``lora`` list (``dtc serve --lora-dir``; serve/adapters.py checks the rest)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=256)
    scale: float = Field(default=1.0, allow_inf_nan=False)


class ImageGenerationRequest(BaseModel):
    """``POST /v1/images/generations``; limits that depend on the model are checked by the server."""

    model_config = ConfigDict(extra="forbid", strict=False)

    prompt: str = Field(min_length=1)
    model: str | None = None
    n: int = Field(default=1, ge=1, le=64)
    size: str | None = None  # "WxH"; None or "auto": the artifact's opt size
    response_format: Literal["b64_json", "url"] = "b64_json"
    output_format: Literal["png", "jpeg", "webp"] = "png"
    output_compression: int | None = Field(default=None, ge=0, le=100)
    user: str | None = Field(default=None, max_length=256)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    num_inference_steps: int | None = Field(default=None, ge=1, le=100_000)  # the server bounds it (--max-steps)
    guidance_scale: float | None = Field(default=None, allow_inf_nan=False, ge=0, le=100)
    negative_prompt: str | None = None
    safety_identifier: str | None = Field(default=None, max_length=256)
    quality: Literal["auto", "low", "medium", "high", "xhigh", "max", "standard", "hd"] | None = None
    style: Literal["vivid", "natural"] | None = None
    background: Literal["auto", "opaque", "transparent"] | None = None
    moderation: Literal["auto", "low"] | None = None
    stream: bool | None = None
    partial_images: int | None = Field(default=None, ge=0, le=3)

    lora: list[LoraItem] | None = Field(default=None, max_length=16)

    def check_openai_fields(self) -> None:
        """APIError 400 naming the field whose value asks for what this server cannot do (the field rule)."""
        if self.quality not in (None, "auto"):
            raise APIError(
                400,
                f"quality {self.quality!r}: this server does not map quality to steps or size; leave it 'auto' (or "
                "unset) and set num_inference_steps and size",
                param="quality",
            )
        if self.style is not None:
            raise APIError(
                400, f"style {self.style!r}: not supported by diffusion models here; describe the style in the prompt",
                param="style",
            )  # fmt: skip
        if self.background == "transparent":
            raise APIError(
                400, "background 'transparent': these models make opaque images; use 'opaque' or 'auto'",
                param="background",
            )  # fmt: skip
        if self.partial_images and not self.stream:
            raise APIError(400, "partial_images: previews are sent only when streaming; set stream: true",
                           param="partial_images")  # fmt: skip
        if self.stream and self.n != 1:
            raise APIError(400, f"n: a streamed request makes one image (got n={self.n}); set n: 1", param="n")
        if self.stream and self.response_format == "url":
            raise APIError(400, "response_format 'url': a stream sends b64_json images; drop response_format",
                           param="response_format")  # fmt: skip

    def pixel_size(self) -> tuple[int, int] | None:
        """(width, height) from ``size``; None for the model's default. APIError 400 when malformed."""
        if self.size in (None, "auto"):
            return None
        match = SIZE_RE.match(self.size)
        if not match:
            raise APIError(400, f"size {self.size!r}: expected 'WIDTHxHEIGHT' such as '1024x1024'", param="size")
        return int(match.group(1)), int(match.group(2))


def parse_request(payload: Any) -> ImageGenerationRequest:
    """The request model for a decoded JSON body, or APIError 400 naming the first bad field."""
    if not isinstance(payload, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        req = ImageGenerationRequest.model_validate(payload)
    except ValidationError as exc:
        err = exc.errors()[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        if err["type"] == "extra_forbidden":
            message = f"{param}: unknown parameter (this server accepts: {', '.join(accepted_fields())})"
        else:
            message = f"{param}: {err['msg']}"
        raise APIError(400, message, param=param) from None
    req.check_openai_fields()
    return req


def parse_edit_form(fields: dict[str, Any]) -> ImageGenerationRequest:
    """``POST /v1/images/edits``'s form fields (everything but the image; ``lora`` already gathered into its list)
    as a request, APIError 400 naming the first bad one; the same parameters as generations (form values are
    strings, converted here)."""
    return parse_request(dict(fields))


def read_reference(data: bytes, filename: str | None, max_pixels: int, fit: tuple[int, int] | None = None) -> Any:
    """The uploaded reference image as RGB PIL, or APIError 400 naming ``image`` (``runtime.inputs``' checks, made
    from the header before decoding: PNG, JPEG or WebP only, not CMYK, at most ``max_pixels``; 16-bit PNGs
    scaled). ``fit``: the generation size it is resized to at once, so a queued edit holds only that copy."""
    from dtcompile.core.errors import InputError
    from dtcompile.runtime.inputs import WEB_FORMATS, read_reference_image

    if not data:
        raise APIError(400, "image: the uploaded file is empty", param="image")
    try:
        return read_reference_image(data, flag="image", name=filename or "the upload", max_pixels=max_pixels,
                                    formats=WEB_FORMATS, fit=fit)  # fmt: skip
    except InputError as exc:
        raise APIError(400, str(exc), param="image") from None


def accepted_fields() -> list[str]:
    return list(ImageGenerationRequest.model_fields)
