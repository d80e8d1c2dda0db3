"""The served ``/openapi.json``: FastAPI's route list with what the routes really take and answer.

The routes read their bodies themselves (to bound size and time while reading), so FastAPI's generated schema
has no request bodies and documents a 422 the server never sends. This module writes the request bodies (the
JSON request model, the multipart edit form), the answers (images, the event stream, OpenAI's error body with
the statuses each route can return) and the bearer scheme, and drops the 422s.
"""

from __future__ import annotations

from typing import Any

from dtcompile.serve.protocol import SIZE_RE, ImageGenerationRequest
from dtcompile.serve.videos import VideoRequest

ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}
IMAGES = {
    "type": "object",
    "required": ["created", "data", "output_format", "size"],
    "properties": {
        "created": {"type": "integer"},
        "data": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"b64_json": {"type": "string"}, "url": {"type": "string"}},
                "minProperties": 1,
                "maxProperties": 1,
            },
        },
        "output_format": {"type": "string", "enum": ["png", "jpeg", "webp"]},
        "size": {"type": "string"},
    },
}
MODEL = {
    "type": "object",
    "required": ["id", "object", "created", "owned_by"],
    "properties": {
        "id": {"type": "string"},
        "object": {"const": "model"},
        "created": {"type": "integer"},
        "owned_by": {"type": "string"},
        "pipeline": {"type": "string"},
        "sizes": {"type": "object"},
        "max_images_per_batch": {"type": "integer"},
    },
}
VIDEO = {
    "type": "object",
    "required": ["id", "object", "model", "status", "progress", "created_at"],
    "properties": {
        "id": {"type": "string"},
        "object": {"const": "video"},
        "model": {"type": "string"},
        "status": {"type": "string", "enum": ["queued", "in_progress", "completed", "failed"]},
        "progress": {"type": "integer", "minimum": 0, "maximum": 100},
        "created_at": {"type": "integer"},
        "completed_at": {"type": ["integer", "null"]},
        "expires_at": {"type": ["integer", "null"]},
        "prompt": {"type": "string"},
        "seconds": {"type": "string"},
        "size": {"type": "string"},
        "error": {"type": ["object", "null"]},
    },
}
WHY = {
    400: "a field is malformed, unknown, refused, or outside what the model takes (param names it)",
    401: "missing or wrong bearer token (only with --api-key-env)",
    404: "unknown model or image",
    408: "the request body did not arrive within --body-timeout",
    409: "the video is not completed (or failed), or is running and cannot be deleted",
    410: "the image's url or the video expired or was evicted from its store",
    413: "the body is over --max-body-bytes",
    416: "the Range is outside the video or malformed",
    429: "the queue is full (Retry-After says when to retry)",
    500: "a failed generation (see the server log)",
    503: "not ready yet, or shutting down",
    504: "not answered within --request-timeout",
}


def _errors(*statuses: int) -> dict[str, Any]:
    return {str(s): {"description": WHY[s], "content": {"application/json": {"schema": ERROR}}} for s in statuses}


def _ok(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"200": {"description": description, "content": {"application/json": {"schema": schema}}}}


#: where the request models' nested models (``LoraItem``) are put: the document's components, not the schema's own
#: ``$defs`` (a ``#/$defs/...`` reference resolves against the document root)
REF_TEMPLATE = "#/components/schemas/{model}"


def _request_schema() -> dict[str, Any]:
    schema = ImageGenerationRequest.model_json_schema(ref_template=REF_TEMPLATE)
    schema.pop("title", None)
    schema.pop("$defs", None)
    schema["properties"]["size"] = {"anyOf": [{"type": "string", "pattern": SIZE_RE.pattern}, {"const": "auto"},
                                              {"type": "null"}], "default": None,
                                    "description": "WIDTHxHEIGHT inside the model's built range (GET /v1/models)"}  # fmt: skip
    return schema


def _edit_form() -> dict[str, Any]:
    fields = _request_schema()
    props = {"image": {"type": "string", "format": "binary", "description": "PNG, JPEG or WebP (not CMYK)"}}
    for name, prop in fields["properties"].items():
        props[name] = prop
    return {"type": "object", "required": ["image", "prompt"], "properties": props}


def _video_schema(multipart: bool) -> dict[str, Any]:
    schema = VideoRequest.model_json_schema()
    schema.pop("title", None)
    if multipart:  # the openai client's form: input_reference as a file
        schema["properties"]["input_reference"] = {"type": "string", "format": "binary"}
    return schema


def _video_answers() -> dict[tuple[str, str], dict[str, Any]]:
    mp4 = {"content": {"video/mp4": {"schema": {"type": "string", "format": "binary"}}}}
    page = {
        "type": "object",
        "required": ["object", "data", "has_more"],
        "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": VIDEO},
                       "first_id": {"type": ["string", "null"]}, "last_id": {"type": ["string", "null"]},
                       "has_more": {"type": "boolean"}},
    }  # fmt: skip
    return {
        ("/v1/videos", "post"): {**_ok(VIDEO, "the queued video"), **_errors(400, 401, 404, 408, 413, 429, 503)},
        ("/v1/videos/generations", "post"): {
            "200": {"description": "the MP4", **mp4},
            **_errors(400, 401, 404, 408, 413, 429, 500, 503, 504),
        },
        ("/v1/videos", "get"): {**_ok(page), **_errors(400, 401)},
        ("/v1/videos/{video_id}", "get"): {**_ok(VIDEO), **_errors(401, 404, 410)},
        ("/v1/videos/{video_id}", "delete"): {**_ok({"type": "object"}), **_errors(401, 404, 409, 410)},
        ("/v1/videos/{video_id}/content", "get"): {
            "200": {"description": "the MP4", **mp4},
            "206": {"description": "the requested byte range of the MP4", **mp4},
            **_errors(400, 401, 404, 409, 410, 416),
        },
    }


def openapi_schema(app: Any) -> dict[str, Any]:
    """The OpenAPI 3.1 document of ``app``'s routes, as the server really answers them."""
    from fastapi.openapi.utils import get_openapi

    doc = get_openapi(title=app.title, version=app.version, routes=app.routes,
                      description="OpenAI-compatible image generation over dtcompile artifacts (docs/serving.md)")  # fmt: skip
    doc.get("components", {}).get("schemas", {}).pop("HTTPValidationError", None)
    doc.get("components", {}).get("schemas", {}).pop("ValidationError", None)
    if not doc.get("components", {}).get("schemas"):
        doc.get("components", {}).pop("schemas", None)
    doc.setdefault("components", {})["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    nested = ImageGenerationRequest.model_json_schema(ref_template=REF_TEMPLATE).get("$defs", {})
    if nested:
        doc["components"].setdefault("schemas", {}).update(nested)
    images = {
        "200": {
            "description": "the images; with stream: true, server-sent events (partial_image ..., completed)",
            "content": {"application/json": {"schema": IMAGES}, "text/event-stream": {"schema": {"type": "string"}}},
        },
        **_errors(400, 401, 404, 408, 413, 429, 500, 503, 504),
    }
    file_ok = {"description": "the image", "content": {m: {"schema": {"type": "string", "format": "binary"}}
                                                       for m in ("image/png", "image/jpeg", "image/webp")}}  # fmt: skip
    answers: dict[tuple[str, str], dict[str, Any]] = {
        ("/health", "get"): _ok({"type": "object", "properties": {"status": {"const": "ok"}}}),
        ("/ready", "get"): {
            **_ok(
                {
                    "type": "object",
                    "properties": {
                        "status": {"const": "ready"},
                        "models": {"type": "array", "items": {"type": "string"}},
                    },
                }
            ),
            **_errors(503),
        },  # fmt: skip
        ("/metrics", "get"): {
            "200": {"description": "Prometheus text format", "content": {"text/plain": {"schema": {"type": "string"}}}}
        },  # fmt: skip
        ("/v1/images/files/{image_id}", "get"): {"200": file_ok, **_errors(404, 410)},
        ("/v1/models", "get"): {
            **_ok(
                {
                    "type": "object",
                    "required": ["object", "data"],
                    "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": MODEL}},
                }
            ),
            **_errors(401),
        },  # fmt: skip
        ("/v1/models/{name}", "get"): {**_ok(MODEL), **_errors(401, 404)},
        ("/v1/images/generations", "post"): images,
        ("/v1/images/edits", "post"): images,
        **_video_answers(),
    }
    bodies = {
        ("/v1/images/generations", "post"): {"application/json": {"schema": _request_schema()}},
        ("/v1/images/edits", "post"): {"multipart/form-data": {"schema": _edit_form()}},
        **{
            (route, "post"): {
                "application/json": {"schema": _video_schema(False)},
                "multipart/form-data": {"schema": _video_schema(True)},
            }
            for route in ("/v1/videos", "/v1/videos/generations")
        },
    }
    for path, item in doc.get("paths", {}).items():
        for method, op in item.items():
            if not isinstance(op, dict):
                continue
            key = (path, "get" if method == "head" else method)
            op["responses"] = answers.get(key, {k: v for k, v in op["responses"].items() if k != "422"})
            if method == "head":  # the GET's statuses and headers, no body
                op["responses"] = {k: {"description": v["description"]} for k, v in op["responses"].items()}
                op["operationId"] = op.get("operationId", path) + "_head"
            if (path, method) in bodies:
                op["requestBody"] = {"required": True, "content": bodies[(path, method)]}
            if path.startswith("/v1/") and not path.startswith("/v1/images/files/"):
                op["security"] = [{"bearer": []}]
            if path == "/v1/images/files/{image_id}":
                for param in op.get("parameters", []):
                    param["schema"] = {"type": "string"}
    return doc
