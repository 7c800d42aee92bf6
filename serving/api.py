"""The SOAP HTTP contract: request and response models, the FastAPI object and the JSON response.

:func:`serving.http_app.build_http_app` registers the routes; the models document them (OpenAPI at
``/docs``). The modes and the batch cap come from :mod:`serving.settings` (the ingress
configuration validates against the same values).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import orjson
from fastapi.responses import Response
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from serving.settings import BATCH_HARD_MAX, MODES, Mode
from serving.store_io import MAX_USER_ID

__all__ = [
    "API_DESCRIPTION",
    "BATCH_HARD_MAX",
    "MODES",
    "BatchItem",
    "BatchRequest",
    "BatchResponse",
    "EmbeddingsResponse",
    "ErrorResponse",
    "Mode",
    "USER_ID_BOUND",
    "UserId",
    "VersionResponse",
    "json_bytes",
    "json_response",
]


#: Exclusive upper bound of user ids (int64). Stated as ``lt=2**63`` rather than ``le=2**63 - 1``: FastAPI's
#: OpenAPI holds bounds as doubles, and 2**63 - 1 is not one (it printed as 9.223372036854776e+18 = 2**63, so a
#: schema-valid id 2**63 was rejected); 2**63 is exact as a double, and the schema states it as an integer
#: (:func:`serving.http_app.exact_integer_bounds`), so schema and validation agree.
USER_ID_BOUND = MAX_USER_ID + 1


def _integral(value: Any) -> Any:
    """A JSON integer as JSON Schema defines it: ``1`` or ``1.0`` (a number with no fraction); never a string, a
    boolean or ``1.5`` (pydantic's lax mode would take ``"1"``, its strict mode would refuse ``1.0``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError("user ids must be integers")
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError("user ids must be integers")
        return int(value)
    return value


UserId = Annotated[int, Field(ge=0, lt=USER_ID_BOUND), BeforeValidator(_integral)]


class EmbeddingsResponse(BaseModel):
    """A user's SUM embeddings, as the mode in force answers them."""

    user_id: int
    mode: Mode = Field(description="Mode that answered.")
    source: Literal["store", "compute", "batch", "frozen"] = Field(
        description="store: the online store's pooled value; compute: the fresh pooled value (realtime); "
        "batch: the daily batch value (offline); frozen: the first snapshot's tower (frozen)."
    )
    snapshot_id: str | None = Field(description="Snapshot that computed the latest version.")
    written_at_ms: int | None = Field(description="When that version was written (computed, for frozen), Unix ms.")
    age_seconds: float | None = Field(description="Seconds since then.")
    pooled_versions: int | None = Field(description="Versions averaged into the value (paper §5.2), 1-3.")
    embeddings: list[list[float]] = Field(description="K embeddings of dimension D (fp16 values as floats).")
    compute: str = Field(
        description="Fate of the compute call: scheduled | dropped (async); completed | timeout | dropped | "
        "failed | skipped (realtime, frozen); not_requested (offline)."
    )


class BatchRequest(BaseModel):
    """Users to read (duplicates are answered once, in first-seen order)."""

    model_config = ConfigDict(extra="forbid")

    user_ids: list[UserId] = Field(
        min_length=1, max_length=BATCH_HARD_MAX, description="Non-negative int64 ids; at most serving.max_batch_users."
    )
    mode: Mode | None = Field(None, description="Mode for this request; default the deployment's mode.")


class BatchItem(BaseModel):
    user_id: int
    status: Literal["ok", "not_found", "timeout", "unavailable"] = Field(
        description="not_found: no stored value (async/realtime/offline) or no features (frozen); "
        "timeout/unavailable: frozen compute did not answer in time / is not loaded."
    )
    source: str | None = None
    snapshot_id: str | None = None
    written_at_ms: int | None = None
    age_seconds: float | None = None
    pooled_versions: int | None = None
    embeddings: list[list[float]] | None = None
    compute: str
    reason: str | None = Field(None, description="Why frozen mode has no embedding for the user: no_features, "
                               "nonfinite_features or nonfinite_embedding (the user is skipped, not the batch).")


class BatchResponse(BaseModel):
    mode: Mode
    count: int = Field(description="Distinct users answered.")
    found: int = Field(description="Users with status ok.")
    results: list[BatchItem]


class VersionResponse(BaseModel):
    """What the compute deployment runs, and the outcome of the last snapshot it was asked to load."""

    snapshot_id: str | None = Field(description="Snapshot whose user tower computes embeddings now.")
    fingerprint: str | None = Field(description="Content hash of that snapshot's manifest.")
    workspace_id: str | None = Field(None, description="Identity of the workspace whose snapshots the app serves "
                                     "(its .sum-workspace.json marker, passed at rollout; None: an unmarked workspace).")
    requested_snapshot_id: str | None = Field(description="Snapshot of the latest user_config.")
    requested_fingerprint: str | None = Field(description="Its fingerprint.")
    last_error: str | None = Field(description="Why the requested snapshot is not running (None if it is): the "
                                   "snapshot and the exception type; the replica's log has the detail.")
    frozen_snapshot_id: str | None = Field(None, description="Snapshot frozen mode computes with.")
    frozen_error: str | None = Field(None, description="Why the requested frozen snapshot is not loaded.")
    cpu_priority: dict = Field(default_factory=dict, description="Scheduling policy and nice level of the compute "
                               "replica's worker threads (compute, load), as the kernel reports them.")
    ingress: dict = Field(default_factory=dict, description="The ingress user_config in force (mode, budgets).")


class ErrorResponse(BaseModel):
    """An error answer: a short reason naming the request id; the cause is in the replica's log under that id."""

    detail: str
    request_id: str | None = Field(None, description="Also in the X-Request-ID header of every answer (a caller's "
                                   "well-formed X-Request-ID is kept).")
    user_id: int | None = None
    mode: str | None = None
    compute: str | None = None


API_DESCRIPTION = (
    "Serves SUM user embeddings (paper §4). Modes: async (stored pooled value, async recompute), "
    "realtime (fresh value within a budget, else stored), offline (daily batch value), frozen (the first "
    "production snapshot's tower). A user with no stored value (or, in frozen mode, no features) gets "
    "404 with a reason; malformed input gets 422 (or 413 for an oversized batch or a body over "
    "serving.max_request_bytes); a store or compute outage gets 503. Error answers name a request id "
    "(X-Request-ID), under which the replica's log holds the cause. With serving.token_file set, every "
    "request but /healthz needs 'Authorization: Bearer <token>' (401 otherwise)."
)


def json_response(content: Any, status_code: int = 200) -> Response:
    """A JSON response serialised once (the route's response_model documents it; FastAPI would otherwise
    validate and re-encode the K x D floats on every read)."""
    return Response(content=json_bytes(content), status_code=status_code, media_type="application/json")


def json_bytes(content: Any) -> bytes:
    """Compact JSON; numpy arrays (the embeddings) serialised natively: float64 prints each fp16 value exactly."""
    return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)
