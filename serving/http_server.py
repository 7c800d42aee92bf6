"""An ASGI app served by uvicorn on the running event loop, on a port other processes may share.

The SOAP read path runs in the ingress replica itself (:class:`serving.ingress.SoapIngress`): no proxy hop.
Ray Serve's HTTP proxy costs ~6 ms a request and saturates at ~220 requests/s on two cores; a uvicorn
server in the replica answers in a fraction of a millisecond.

The listening socket is bound with ``SO_REUSEPORT``: while Serve replaces the ingress replica (a code or
settings change, ``max_surge_percent=100``), the new replica listens on the same port before the old one
stops, and the kernel hands new connections to both. The old one then drains (:meth:`HttpServer.drain`):
it closes its listening socket, answers what arrives on its open connections with ``Connection: close``
for a grace period (clients reconnect, to the new replica), and stops. Linux lets only sockets of the same
user share a port this way.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any

__all__ = ["HttpServer"]

log = logging.getLogger("ray.serve")


class HttpServer:
    """uvicorn serving ``app`` on ``host:port`` from the running event loop.

    Args:
        app: The ASGI application.
        host: Bind address (``serving.host``: 127.0.0.1 unless configured).
        port: TCP port (``serving.port``).
    """

    def __init__(self, app: Any, host: str, port: int) -> None:
        self.host, self.port = host, int(port)
        self._app = app
        self.draining = False
        self._server: Any = None
        self._task: asyncio.Task | None = None
        self._sock: socket.socket | None = None

    async def _asgi(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not self.draining:
            return await self._app(scope, receive, send)

        async def closing(message: dict) -> None:
            if message["type"] == "http.response.start":
                headers = [h for h in message.get("headers", []) if h[0].lower() != b"connection"]
                message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)

        return await self._app(scope, receive, closing)

    def _bind(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind((self.host, self.port))
        except OSError as exc:
            sock.close()
            raise OSError(exc.errno, f"SOAP HTTP server cannot listen on {self.host}:{self.port}: {exc.strerror} "
                          "(another program holds the port? set serving.port)") from exc
        sock.listen(2048)
        sock.setblocking(False)
        return sock

    async def start(self) -> None:
        """Binds and starts serving; returns once the server accepts connections.

        Raises:
            OSError: The address cannot be bound (the message names it).
        """
        import uvicorn

        self._sock = self._bind()
        config = uvicorn.Config(
            self._asgi,
            http="httptools",
            interface="asgi3",
            lifespan="off",
            proxy_headers=False,
            access_log=False,
            log_config=None,
            log_level="warning",
            timeout_keep_alive=30,
            timeout_graceful_shutdown=5,
        )
        self._server = uvicorn.Server(config)
        self._server.install_signal_handlers = lambda: None  # the replica's process owns its signals
        self._task = asyncio.get_running_loop().create_task(self._server.serve(sockets=[self._sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it
                raise RuntimeError(f"SOAP HTTP server on {self.host}:{self.port} stopped while starting")
            await asyncio.sleep(0.01)
        log.info("SOAP HTTP server listening on %s:%d", self.host, self.port)

    def failure(self) -> str | None:
        """Why the server stopped (None while it runs)."""
        if self._task is None:
            return "not started"
        if not self._task.done():
            return None
        exc = None if self._task.cancelled() else self._task.exception()
        return f"stopped: {type(exc).__name__}: {exc}" if exc else "stopped"

    async def drain(self, grace_s: float = 2.0) -> None:
        """Stops taking connections, answers open ones with ``Connection: close`` for ``grace_s``, stops."""
        if self._server is None:
            return
        self.draining = True
        for server in getattr(self._server, "servers", []) or []:
            server.close()  # the listening socket: new connections go to the other listeners of the port
        if self._sock is not None:
            self._sock.close()
        await asyncio.sleep(grace_s)
        self._server.should_exit = True
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout=10)
            except Exception as exc:  # already stopped, or slow to: the process goes anyway
                log.debug("SOAP HTTP server stop: %s", exc)
