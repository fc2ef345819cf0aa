"""GET /v1/model: the loaded model (name, random_weights, labels, config, device, dtype, backend,
parameters, max_audio_s, batching, heads), as `Service.model_summary` holds it."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from emoserve.api.errors import MappedErrorsRoute, ServiceDep
from emoserve.api.schemas import error_responses

MODEL = "/v1/model"

router = APIRouter(route_class=MappedErrorsRoute)


@router.get(MODEL, summary="The loaded model", responses=error_responses(401, 503))
async def model(service: ServiceDep) -> dict[str, Any]:
    if service.model_summary is None:
        raise service.unavailable()
    return service.model_summary
