"""The admin listener: liveness, readiness and the Prometheus scrape endpoint."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest


@dataclass(slots=True)
class ServerState:
    """The one piece of state shared by both listeners: ready once listening, draining on SIGTERM."""

    ready: bool = False
    draining: bool = False


STATE = web.AppKey("state", ServerState)
REGISTRY = web.AppKey("registry", CollectorRegistry)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if state.ready and not state.draining:
        return web.json_response({"status": "ready"})
    return web.json_response({"status": "draining" if state.draining else "starting"}, status=503)


async def metrics(request: web.Request) -> web.Response:
    # rendering is pure Python and grows with routes x series: in a thread, the event loop keeps
    # serving traffic between the interpreter's switch intervals instead of stalling for the scrape
    body = await asyncio.to_thread(generate_latest, request.app[REGISTRY])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def create_admin_app(state: ServerState, registry: CollectorRegistry) -> web.Application:
    app = web.Application()
    app[STATE] = state
    app[REGISTRY] = registry
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app
