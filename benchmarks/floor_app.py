"""The physical floor of the serving benchmark: a bare Starlette JSON no-op under uvicorn (httptools), the same
server stack the SOAP ingress replica runs, with nothing behind it.

Run by ``benchmarks/serving_bench.py`` as ``python -m uvicorn benchmarks.floor_app:app --http httptools``.
"""

from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route


async def noop(request) -> JSONResponse:
    return JSONResponse({"ok": True})


app = Starlette(routes=[Route("/", noop)])
