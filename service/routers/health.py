"""Liveness and readiness (open even when API keys are set) and Prometheus metrics (an
admin key when keys are set: they name every gallery)."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request, Response

from ..errors import ServiceError
from ..metrics import CONTENT_TYPE
from ..schemas import Health, Readiness
from ..store import StoreError, StoreUnavailable
from .common import errors

log = logging.getLogger(__name__)
router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health, summary="The process is alive")
async def healthz() -> Health:
    return Health()


@router.get("/readyz", response_model=Readiness, responses=errors(503),
            summary="The model is loaded and the store answers")
def readyz(request: Request) -> Readiness:
    state = request.app.state
    checks: dict[str, str] = {}
    engine, store = state.engine, state.store
    checks["model"] = "ok" if engine is not None else state.model_status
    if store is None:
        checks["store"] = "not created: the model is not loaded"
    else:
        try:
            store.ping()
            checks["store"] = "ok"
        except StoreUnavailable as exc:
            log.warning("readiness: %s", exc)
            checks["store"] = exc.public
        except StoreError as exc:
            log.warning("readiness: %s", exc)
            checks["store"] = "the gallery store failed; see the service log"
    failing = {name: why for name, why in checks.items() if why != "ok"}
    if failing:
        raise ServiceError(503, "not_ready",
                           "; ".join(f"{name}: {why}" for name, why in failing.items()),
                           details={"checks": checks}, headers={"Retry-After": "5"})
    return Readiness(model_id=engine.model_id, variant=engine.variant,
                     providers=list(engine.providers), store=store.kind,
                     persistent=store.persistent, warnings=list(state.warnings))


@router.get("/metrics", summary="Prometheus metrics", response_class=Response,
            responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text"},
                       **errors(401, 403)})
def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE)
