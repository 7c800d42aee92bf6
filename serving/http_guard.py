"""What a request passes before the SOAP API sees it: a request id, the bearer token, the body limit.

:class:`RequestGuard` wraps the ASGI app the ingress serves (:mod:`serving.ingress`):

* **request id**: a caller's well-formed ``X-Request-ID`` is kept, else one is made (a random prefix per
  replica and a counter, so ids are unique across replicas and ordered within one). It is in
  ``scope["state"]["request_id"]`` for the routes (error bodies name it, the replica's log lines carry it) and in
  the ``X-Request-ID`` header of every answer.
* **token** (``serving.token_file``): every request but ``/healthz`` needs ``Authorization: Bearer <token>``,
  compared in constant time; 401 otherwise. Required when ``serving.host`` is not loopback
  (:func:`serving.settings.check_access`).
* **body limit** (``serving.max_request_bytes``): a declared ``Content-Length`` past it is answered 413 before a
  byte of the body is read; a streamed (chunked) body is read up to the limit and then no further (413, and the
  connection is closed, so the rest is never read). FastAPI would otherwise buffer and JSON-decode any body
  before its models' bounds apply.
"""

from __future__ import annotations

import hmac
import itertools
import re
import secrets
from typing import Any

import orjson

__all__ = ["REQUEST_ID_HEADER", "RequestGuard", "RequestIds", "byte_size", "request_id"]

#: The header a caller may send its own request id in, and every answer carries.
REQUEST_ID_HEADER = "X-Request-ID"
_RID = REQUEST_ID_HEADER.lower().encode()
#: A caller's id is kept when it is this: short, printable, no spaces (it goes into logs and headers).
_WELL_FORMED_ID = re.compile(rb"[A-Za-z0-9._:@/+=-]{1,128}")


def request_id(scope: dict) -> str:
    """The request id :class:`RequestGuard` gave the request (``-`` for a scope it did not see)."""
    return (scope.get("state") or {}).get("request_id", "-")


def byte_size(n: int) -> str:
    """``1048576`` -> ``1 MiB``; ``1536`` -> ``1.5 KiB``; ``100`` -> ``100 bytes``."""
    for unit, size in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.{0 if n % size == 0 else 1}f} {unit}"
    return f"{n} bytes"


class RequestIds:
    """Request ids of one replica: ``<8 random hex>-<counter in hex>``."""

    def __init__(self) -> None:
        self.prefix = secrets.token_hex(4)
        self._count = itertools.count(1)

    def __call__(self) -> str:
        return f"{self.prefix}-{next(self._count):x}"


class RequestGuard:
    """ASGI middleware: request id, token, body limit (see the module docstring).

    Args:
        app: The API.
        max_request_bytes: Largest request body read (``serving.max_request_bytes``).
        token: The bearer token every request but ``open_paths`` must carry (None: no token required).
        open_paths: Paths answered without the token (``/healthz``, under the route prefix).
    """

    def __init__(self, app: Any, *, max_request_bytes: int, token: str | None = None,
                 open_paths: tuple[str, ...] = ("/healthz",)) -> None:
        self.app = app
        self.max_request_bytes = int(max_request_bytes)
        self._token = token.encode() if token else None
        self.open_paths = frozenset(open_paths)
        self.ids = RequestIds()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = length = auth = None
        streamed = False
        for name, value in scope["headers"]:
            if name == _RID:
                rid = value if _WELL_FORMED_ID.fullmatch(value) else None
            elif name == b"content-length":
                length = value
            elif name == b"transfer-encoding":
                streamed = True
            elif name == b"authorization":
                auth = value
        rid_str = rid.decode() if rid is not None else self.ids()
        scope.setdefault("state", {})["request_id"] = rid_str
        rid_header = (_RID, rid_str.encode())

        async def send_with_id(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), rid_header]}
            await send(message)

        if self._token is not None and scope["path"] not in self.open_paths and not self._authorized(auth):
            return await _reject(send_with_id, 401, "missing or wrong bearer token (serving.token_file)", rid_str,
                                 [(b"www-authenticate", b"Bearer")])
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                declared = -1
            if declared < 0:
                return await _reject(send_with_id, 400, "malformed Content-Length", rid_str, close=True)
            if declared > self.max_request_bytes:
                return await _reject(send_with_id, 413, self._too_large(), rid_str, close=True)
        if streamed:  # no length to trust: read up to the limit here, hand the app what was read
            body = bytearray()
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    return  # the client went away
                body += message.get("body", b"")
                if len(body) > self.max_request_bytes:
                    return await _reject(send_with_id, 413, self._too_large(), rid_str, close=True)
                if not message.get("more_body", False):
                    break
            receive = _replay(bytes(body), receive)
        return await self.app(scope, receive, send_with_id)

    def _authorized(self, auth: bytes | None) -> bool:
        scheme, _, credential = (auth or b"").partition(b" ")
        ok = hmac.compare_digest(credential.strip(), self._token or b"")
        return ok and scheme.lower() == b"bearer"

    def _too_large(self) -> str:
        return f"request body over {byte_size(self.max_request_bytes)} (serving.max_request_bytes)"


def _replay(body: bytes, receive: Any) -> Any:
    """A ``receive`` that gives the body read already, then what the server says (a disconnect)."""
    sent = False

    async def replay() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _reject(send: Any, status: int, detail: str, rid: str, headers: list | None = None,
                  close: bool = False) -> None:
    """Answers ``status`` with ``{"detail", "request_id"}``; ``close``: and closes the connection (an unread body
    stays unread)."""
    body = orjson.dumps({"detail": f"{detail}; request id {rid}", "request_id": rid})
    extra = [*(headers or ()), *([(b"connection", b"close")] if close else [])]
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *extra]})
    await send({"type": "http.response.body", "body": body})
