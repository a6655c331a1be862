"""``GET /v1/models`` (the served model names, all aliases of one model) and ``GET
/v1/models/{id}`` (one of them; an unknown id is a 404 in OpenAI's error shape)."""

from __future__ import annotations

from fastapi import APIRouter

from ...sampling_params import shorten
from .. import admission
from ..errors import OpenAIError
from ..protocol import ModelCard, ModelList
from ..responses import AUTH_RESPONSES, GENERATION_RESPONSES
from ..state import ServerState

router = APIRouter()


def _card(state: ServerState, name: str) -> ModelCard:
    return ModelCard(
        id=name,
        created=int(state.started_at),
        root=str(state.config.model.path),
        max_model_len=state.config.model.max_model_len,
    )


@router.get("/v1/models", response_model=ModelList, responses=AUTH_RESPONSES, summary="List models")
async def list_models(state: admission.StateDep) -> ModelList:
    return ModelList(data=[_card(state, name) for name in state.args.served_model_names])


@router.get(
    "/v1/models/{model_id:path}",
    response_model=ModelCard,
    responses={**AUTH_RESPONSES, 404: GENERATION_RESPONSES[404]},
    summary="Retrieve a model",
)
async def retrieve_model(model_id: str, state: admission.StateDep) -> ModelCard:
    if model_id not in state.args.served_model_names:
        raise OpenAIError(
            404,
            f"the model {shorten(model_id, 100)!r} does not exist",
            param="model",
            code="model_not_found",
        )
    return _card(state, model_id)
