"""The SOAP HTTP API: a FastAPI application answering every read through one :class:`serving.client.SoapClient`.

Routes (the contract's models are in :mod:`serving.api`; OpenAPI at ``/openapi.json``, docs at ``/docs``):

``GET /users/{user_id}/embeddings``   one user, in the mode in force or ``?mode=``; 404 for a user with no stored
                                      value (or no features, frozen), 503 when the store or frozen compute fails
``POST /embeddings/batch``            many users, per-user status; 413 past ``serving.max_batch_users``
``GET /version``                      the snapshots the compute deployment runs and the config in force
``GET /healthz``                      liveness and counters
``GET /metrics``                      this node's ``ray_soap_*`` Prometheus families

Error answers carry a short reason and the request id (``request_id``, and the ``X-Request-ID`` header that every
answer carries: :mod:`serving.http_guard`); what caused them (exception text, folders, hosts) goes to the replica's
log under that id, never to the caller.

The app is plain ASGI: :class:`serving.ingress.SoapIngress` runs it in its replica on ``serving.port``
(:mod:`serving.http_server`) with no proxy in front, and a test or a benchmark can run it anywhere.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import orjson
from fastapi import FastAPI, Query, Request
from fastapi import Path as PathParam
from fastapi.exception_handlers import http_exception_handler, request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.api import (
    API_DESCRIPTION,
    USER_ID_BOUND,
    BatchRequest,
    BatchResponse,
    MODES,
    EmbeddingsResponse,
    ErrorResponse,
    Mode,
    VersionResponse,
    json_bytes,
    json_response,
)
from serving.client import SKIP_REASONS, NoMetrics, StoreUnavailable, log_store_failure
from serving.http_guard import request_id
from serving.metrics import filter_families

if TYPE_CHECKING:
    from serving.client import SoapClient

__all__ = ["FastUserReads", "answer_user", "build_http_app", "exact_integer_bounds", "item_json"]

log = logging.getLogger("ray.serve")

_BLANK = dict.fromkeys(("source", "snapshot_id", "written_at_ms", "age_seconds", "pooled_versions", "embeddings", "reason"))


def item_json(item: dict) -> dict:
    """A client item as the API returns it: embeddings as ``[K][D]`` floats (the fp16 values, exactly)."""
    emb = item.get("embeddings")
    if emb is None:
        return item
    return {**item, "embeddings": np.asarray(emb).astype(np.float64)}


def build_http_app(
    client: "SoapClient",
    *,
    metrics: Any = None,
    metrics_url: Callable[[], str] | None = None,
) -> FastAPI:
    """The SOAP API over ``client``.

    Args:
        client: Answers the reads (its event loop must be the server's: :meth:`SoapClient.bind_loop`).
        metrics: :class:`serving.metrics.IngressMetrics` for the per-request latency and code counters.
        metrics_url: Returns the Prometheus endpoint ``/metrics`` filters (default: this Ray node's).
    """
    sink = metrics if metrics is not None else NoMetrics()
    state: dict[str, Any] = {"metrics_url": None}
    app = FastAPI(title="SOAP - SUM Online Asynchronous Platform", description=API_DESCRIPTION, version="2")

    def observe(mode: str, endpoint: str, code: int, t0: float) -> None:
        sink.read_latency.observe(time.perf_counter() - t0, tags={"mode": mode, "endpoint": endpoint})
        sink.requests.inc(tags={"mode": mode, "endpoint": endpoint, "code": str(code)})

    @app.get(
        "/users/{user_id}/embeddings",
        response_model=EmbeddingsResponse,
        responses={
            404: {"model": ErrorResponse, "description": "No stored value for the user (cold or unknown user)."},
            422: {"description": "Malformed user id or mode."},
            503: {"model": ErrorResponse, "description": "Online store unreadable, or frozen compute unavailable."},
        },
        summary="One user's SUM embeddings, answered in the mode in force (or ?mode=)",
    )
    async def get_embeddings(
        request: Request,
        user_id: int = PathParam(..., ge=0, lt=USER_ID_BOUND, description="User id (non-negative int64)."),
        mode: Mode | None = Query(None, description="Override the deployment's mode for this request."),
    ):
        code, content = await answer_user(client, user_id, mode, time.perf_counter(), observe, request_id(request.scope))
        return json_response(content, status_code=code)

    app.state.answer_user = lambda user_id, mode, t0, rid: answer_user(client, user_id, mode, t0, observe, rid)

    @app.post(
        "/embeddings/batch",
        response_model=BatchResponse,
        responses={
            400: {"description": "A body that is not JSON-decodable."},
            413: {"model": ErrorResponse, "description": "More users than serving.max_batch_users."},
            422: {"description": "Malformed body (non-integer, negative or out-of-range ids, unknown mode)."},
            503: {"model": ErrorResponse, "description": "Online store unreadable."},
        },
        summary="Many users' SUM embeddings in one call (per-user status)",
    )
    async def get_embeddings_batch(body: BatchRequest, request: Request):
        t0 = time.perf_counter()
        mode = body.mode or client.config["mode"]
        ids = list(dict.fromkeys(body.user_ids))
        limit = int(client.config["max_batch_users"])
        if len(ids) > limit:
            observe(mode, "batch", 413, t0)
            rid = request_id(request.scope)
            return JSONResponse(
                status_code=413,
                content={"detail": f"{len(ids)} distinct user ids; at most {limit} per request (serving.max_batch_users)",
                         "mode": mode, "request_id": rid},
            )
        try:
            items = await client.answer(ids, mode, t0)
        except StoreUnavailable as exc:
            client.stats["requests"] += 1
            observe(mode, "batch", 503, t0)
            return JSONResponse(status_code=503, content={**_failure(exc, request_id(request.scope)), "mode": mode})
        client.account(items, mode)
        results = [{**_BLANK, **item_json(items[u])} for u in ids]
        observe(mode, "batch", 200, t0)
        found = sum(1 for r in results if r["status"] == "ok")
        return json_response({"mode": mode, "count": len(results), "found": found, "results": results})

    @app.get(
        "/version",
        response_model=VersionResponse,
        responses={503: {"model": ErrorResponse}},
        summary="Snapshots the compute deployment runs (production and frozen) and the ingress config",
    )
    async def version(request: Request):
        rid = request_id(request.scope)
        info, reason = await _compute_version(client, rid, "/version")
        if info is None:
            return JSONResponse(status_code=503, content={
                "detail": f"compute deployment unavailable ({reason}); request id {rid}", "request_id": rid})
        return json_response({**info, "ingress": {**client.config, "config_error": client.config_error}})

    @app.get("/healthz", summary="Liveness, the loaded snapshot ids, the mode and counters")
    async def healthz(request: Request):
        rid = request_id(request.scope)
        info, reason = await _compute_version(client, rid, "/healthz")
        error = f"compute deployment unavailable ({reason})" if reason else (info or {}).get("last_error")
        return json_response({
            "status": "ok" if info and info.get("snapshot_id") else "degraded",
            "mode": client.config["mode"],
            "snapshot_id": (info or {}).get("snapshot_id"),
            "frozen_snapshot_id": (info or {}).get("frozen_snapshot_id"),
            "compute_error": f"{error}; request id {rid}" if error else None,
            **client.health(),
        })

    @app.get(
        "/metrics",
        response_class=PlainTextResponse,
        summary="The SOAP Prometheus metrics (ray_soap_*) exported by this node's Ray metrics agent",
    )
    async def prometheus(request: Request):
        import httpx

        try:
            url = state["metrics_url"] or await asyncio.get_running_loop().run_in_executor(
                None, metrics_url or local_metrics_url
            )
            state["metrics_url"] = url
            async with httpx.AsyncClient(timeout=5.0) as http:
                resp = await http.get(url)
            resp.raise_for_status()
        except Exception as exc:
            state["metrics_url"] = None
            rid = request_id(request.scope)
            log.warning("request %s: /metrics: Ray metrics endpoint unavailable: %s: %s", rid, type(exc).__name__, exc)
            return PlainTextResponse(f"# Ray metrics endpoint unavailable ({type(exc).__name__}); request id {rid}\n",
                                     status_code=503)
        return PlainTextResponse(filter_families(resp.text), media_type="text/plain; version=0.0.4")

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):  # FastAPI's 422, with the request id
        return _with_request_id(await request_validation_exception_handler(request, exc), request)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):  # 400, 404, 405, ... with the request id
        return _with_request_id(await http_exception_handler(request, exc), request)

    @app.exception_handler(Exception)
    async def crashed(request: Request, exc: Exception):  # a bug: the trace in the log, the id to the caller
        rid = request_id(request.scope)
        log.error("request %s: %s %s failed", rid, request.method, request.url.path, exc_info=exc)
        return JSONResponse(status_code=500, content={"detail": f"internal error; request id {rid}", "request_id": rid})

    plain_openapi = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            exact_integer_bounds(plain_openapi())  # cached by FastAPI; fixed in place once
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def _failure(exc: StoreUnavailable, rid: str) -> dict:
    """A store failure as the caller gets it (the reason and the request id); its detail goes to the log."""
    log_store_failure(exc, rid)
    return {"detail": f"{exc.reason}; request id {rid}", "request_id": rid}


async def _compute_version(client: "SoapClient", rid: str, route: str) -> tuple[dict | None, str | None]:
    """``ComputeCenter.version()`` without its error details (logged under the request id), or ``(None, reason)``."""
    info, reason, detail = await client.compute_version()
    details = [detail] if detail else (info or {}).pop("errors_detail", None) or []
    for text in details:
        log.warning("request %s: %s: %s", rid, route, text)
    return info, reason


def _with_request_id(response: Any, request: Request) -> Any:
    """FastAPI's own error answer with the request id in its JSON body too."""
    rid = request_id(request.scope)
    try:
        content = orjson.loads(response.body)
    except orjson.JSONDecodeError:
        return response
    if isinstance(content, dict):
        content["request_id"] = rid
    headers = {k: v for k, v in response.headers.items() if k.lower() not in ("content-length", "content-type")}
    return JSONResponse(status_code=response.status_code, content=content, headers=headers)


async def answer_user(
    client: "SoapClient", user_id: int, mode: str | None, t0: float, observe: Callable[[str, str, int, float], None],
    rid: str = "-",
) -> tuple[int, dict]:
    """``GET /users/{user_id}/embeddings`` for a valid id and mode: ``(status code, JSON content)``; ``rid``: the
    request id a failure names."""
    mode = mode or client.config["mode"]
    try:
        item = (await client.answer([user_id], mode, t0))[user_id]
    except StoreUnavailable as exc:
        client.stats["requests"] += 1
        observe(mode, "user", 503, t0)
        return 503, {**_failure(exc, rid), "user_id": user_id, "mode": mode}
    client.account({user_id: item}, mode)
    status = item.pop("status")
    if status != "ok":
        code = 404 if status == "not_found" else 503
        why = SKIP_REASONS.get(item.pop("reason", None) or "no_features")
        detail = {
            "not_found": f"no embeddings for user {user_id}"
            + (f" ({why})" if mode == "frozen" else " stored" if mode != "offline" else " from the daily batch"),
            "timeout": f"frozen compute did not answer within {client.config['frozen_timeout_ms']} ms",
            "unavailable": "no frozen snapshot loaded",
        }[status]
        observe(mode, "user", code, t0)
        return code, {"detail": detail, "user_id": user_id, "mode": mode, "compute": item["compute"], "request_id": rid}
    observe(mode, "user", 200, t0)
    return 200, {"mode": mode, **item_json(item)}


_USER_PATH = re.compile(r"/users/([0-9]{1,19})/embeddings")
_MODE_QUERIES = {b"": None, **{f"mode={m}".encode(): m for m in MODES}}


class FastUserReads:
    """The hot route without the framework: ``GET /users/{id}/embeddings[?mode=]`` with a well-formed id and mode
    is answered by :func:`answer_user` straight from ASGI (FastAPI's routing, dependency and validation layers
    were ~15 % of a read's CPU); every other request - and any id or query FastAPI would reject or parse
    differently - goes to the FastAPI app, which owns the schema and the 4xx answers.

    Args:
        app: The app of :func:`build_http_app`.
    """

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self._answer = app.state.answer_user

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "GET" and scope["query_string"] in _MODE_QUERIES:
            path, root = scope["path"], scope.get("root_path", "")
            if root and path.startswith(root):
                path = path[len(root):]
            match = _USER_PATH.fullmatch(path)
            if match is not None and int(match.group(1)) < USER_ID_BOUND:
                t0 = time.perf_counter()
                code, content = await self._answer(int(match.group(1)), _MODE_QUERIES[scope["query_string"]], t0,
                                                   request_id(scope))
                body = json_bytes(content)
                await send({"type": "http.response.start", "status": code,
                            "headers": [(b"content-length", str(len(body)).encode()),
                                        (b"content-type", b"application/json")]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


def exact_integer_bounds(node: Any) -> None:
    """Integer bounds of a schema restored to integers, in place.

    FastAPI's OpenAPI model types ``minimum`` / ``exclusiveMaximum`` as floats, so the int64 bound of user ids
    came out as ``9.223372036854776e+18`` in request bodies: a generator reading that as a double admits ids
    up to ~2**63 + 1024 that validation rejects. The bound is ``2**63`` (exclusive), exact as a double, so the
    integer it stands for is known.
    """
    if isinstance(node, dict):
        if node.get("type") == "integer":
            for key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
                value = node.get(key)
                if isinstance(value, float) and value.is_integer():
                    node[key] = int(value)
        for value in node.values():
            exact_integer_bounds(value)
    elif isinstance(node, list):
        for value in node:
            exact_integer_bounds(value)


def local_metrics_url() -> str:
    """This Ray node's Prometheus endpoint (the agent listens on the node address, or every address)."""
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    for node in ray.nodes():
        if node.get("NodeID") == node_id and node.get("MetricsExportPort"):
            return f"http://127.0.0.1:{int(node['MetricsExportPort'])}/metrics"
    raise RuntimeError("this node has no metrics export port")
