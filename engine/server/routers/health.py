"""Probes and metrics, always open (no API key): ``/health`` (liveness), ``/ready``
(readiness with a JSON reason), both also for ``HEAD`` (the status alone), ``/metrics``
(Prometheus text) and ``/version`` (the installed package's version)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from .. import admission
from ..metrics import CONTENT_TYPE

router = APIRouter()

_PROBE_RESPONSES = {503: {"description": "Not alive / not ready; the body says why."}}


@router.api_route(
    "/health",
    methods=["GET", "HEAD"],
    summary="Liveness: 200 while the engine core is alive",
    responses=_PROBE_RESPONSES,
)
async def health(state: admission.StateDep) -> JSONResponse:
    dead = state.readiness.dead_reason
    if dead is not None:
        return JSONResponse({"status": "dead", "reason": dead}, status_code=503)
    return JSONResponse({"status": "ok"})


@router.api_route(
    "/ready",
    methods=["GET", "HEAD"],
    summary="Readiness: 200 when this replica should get traffic",
    responses=_PROBE_RESPONSES,
)
async def ready(state: admission.StateDep) -> JSONResponse:
    ok, reason = state.readiness.status()
    body = {"status": "ready" if ok else "not ready", "reason": reason}
    stats = state.engine.stats if state.engine is not None else None
    if stats is not None:
        body["kv_cache_usage"] = round(stats.kv_cache_usage, 4)
        body["num_requests_waiting"] = stats.num_waiting
        body["num_requests_running"] = stats.num_running
    return JSONResponse(body, status_code=200 if ok else 503)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(state: admission.StateDep) -> Response:
    return Response(state.metrics.render(), media_type=CONTENT_TYPE)


@router.get(
    "/version",
    summary="Server version",
    description='The installed metroline package\'s version: `{"version": "0.1.0"}`.',
)
async def version() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as package_version

    try:
        return {"version": package_version("metroline")}
    except PackageNotFoundError:
        return {"version": "unknown"}
