"""Request and response bodies of the prediction API (pydantic models; they make the OpenAPI schema)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "ErrorResponse",
    "HealthResponse",
    "InfoResponse",
    "NewKeyRequest",
    "NewKeyResponse",
    "PredictRequest",
    "PredictResponse",
    "ProfileResponse",
    "json_request_schema",
    "multipart_schema",
]


class PredictRequest(BaseModel):
    """A JSON batch: exactly one of ``images`` (nested arrays) or ``npy`` (base64 of a ``.npy`` file).

    Both hold float32-compatible pixels in [0, 1], shape ``(N, C, H, W)`` (see ``GET /v1/info``).
    ``npy`` is the fast path: about 4 bytes per pixel instead of ~10 and no number parsing.
    """

    model_config = ConfigDict(extra="forbid")

    images: list[list[list[list[float]]]] | None = Field(
        default=None, description="Pixel values, nested as (N, C, H, W), in [0, 1]."
    )
    npy: str | None = Field(
        default=None,
        description="Base64 of a .npy file (numpy.save) holding a float array (N, C, H, W) in [0, 1].",
    )


class PredictResponse(BaseModel):
    """Answers for one batch, in the key's output mode."""

    output_mode: Literal["soft", "hard", "topk"]
    labels: list[int] = Field(description="Top-1 class per image.")
    probabilities: list[list[float]] | None = Field(
        description="Probability rows (soft; topk: the k largest renormalised, zeros elsewhere); null for hard."
    )
    queries_charged: int = Field(description="Queries this request cost (one per image).")
    queries_used: int = Field(description="Queries charged to this key so far, this request included.")
    budget: int | None = Field(description="This key's query budget (null: unlimited).")
    budget_left: int | None


class NewKeyRequest(BaseModel):
    """An admin's request for a new API key."""

    name: str = Field(description="A label for the key.")
    budget: int | None = Field(default=None, description="Query budget (null: unlimited).")
    output_mode: str = Field(default="soft", description="soft, hard or topk.")
    top_k: int = Field(default=1, description="Classes per answer in topk mode.")


class NewKeyResponse(BaseModel):
    """A new API key: its id and its secret (shown once)."""

    key_id: str
    secret: str
    budget: int | None
    created_at: str


class ProfileResponse(BaseModel):
    """One key's query profile (exits, entropy, confidence) and its monitor verdict."""

    key_id: str
    profile: dict[str, Any] = Field(description="queries, exit_counts, exit_hist, entropy and confidence moments.")
    monitor: str | None = Field(description="The server's monitor (null: profiles only).")
    verdict: dict[str, Any] | None = Field(description="flagged, queries, flagged_at, score, threshold.")
    id_reference: dict[str, Any] | None = Field(description="The held-out ID profile measured at calibration.")


class InfoResponse(BaseModel):
    """Public facts about the served model and the caller's key (nothing about the defense)."""

    model: str
    num_classes: int
    classes: list[str]
    input_shape: list[int] = Field(description="Per-image shape (C, H, W).")
    input_dtype: Literal["float32"] = "float32"
    value_range: list[float] = Field(description="Pixel range [low, high].")
    formats: list[str] = Field(description="Accepted request bodies.")
    max_batch: int
    max_body_bytes: int
    output_mode: Literal["soft", "hard", "topk"]
    top_k: int
    budget: int | None
    queries_used: int


class HealthResponse(BaseModel):
    """Liveness."""

    status: Literal["ok"] = "ok"


class ErrorResponse(BaseModel):
    """Every 4xx/5xx answer: a machine-readable code and a message saying what was wrong."""

    error: str = Field(description="Error code, e.g. invalid_input, budget_exceeded, unauthorized.")
    message: str
    request_id: str | None = None
    requested: int | None = Field(default=None, description="budget_exceeded: images in the refused batch.")
    used: int | None = Field(default=None, description="budget_exceeded: queries charged before it.")
    budget: int | None = Field(default=None, description="budget_exceeded: the key's budget.")


def multipart_schema() -> dict[str, Any]:
    """OpenAPI schema of the PNG upload body (``files``: one PNG per image)."""
    return {
        "type": "object",
        "properties": {
            "files": {
                "type": "array",
                "items": {"type": "string", "format": "binary"},
                "description": "One PNG per image, of the model's height and width (8-bit; scaled by 1/255).",
            }
        },
        "required": ["files"],
    }


def json_request_schema(shape: tuple[int, int, int], max_batch: int) -> dict[str, Any]:
    """OpenAPI schema of the JSON predict body for a model taking ``shape`` = ``(C, H, W)`` images.

    Tighter than :class:`PredictRequest` alone: it states the exact nesting sizes, the batch limit,
    the pixel range and that exactly one of ``images`` / ``npy`` is sent.
    """

    def exactly(n: int, items: dict[str, Any]) -> dict[str, Any]:
        return {"type": "array", "minItems": n, "maxItems": n, "items": items}

    c, h, w = shape
    pixel = {"type": "number", "minimum": 0.0, "maximum": 1.0}
    image = exactly(c, exactly(h, exactly(w, pixel)))
    return {
        "type": "object",
        "description": PredictRequest.__doc__,
        "properties": {
            "images": {
                "type": "array",
                "minItems": 1,
                "maxItems": max_batch,
                "items": image,
                "description": f"Pixel values nested as (N, {c}, {h}, {w}), in [0, 1].",
            },
            "npy": {
                "type": "string",
                "format": "byte",
                "description": f"Base64 of a .npy file holding a float32 array (N, {c}, {h}, {w}) in [0, 1].",
            },
        },
        "additionalProperties": False,
        "minProperties": 1,
        "maxProperties": 1,
    }
