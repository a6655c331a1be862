"""``GET /v1/models``: the served model names (all aliases of one model)."""

from __future__ import annotations

from fastapi import APIRouter

from .. import admission
from ..protocol import ModelCard, ModelList
from ..responses import AUTH_RESPONSES

router = APIRouter()


@router.get("/v1/models", response_model=ModelList, responses=AUTH_RESPONSES, summary="List models")
async def list_models(state: admission.StateDep) -> ModelList:
    root = str(state.config.model.path)
    return ModelList(
        data=[
            ModelCard(
                id=name,
                created=int(state.started_at),
                root=root,
                max_model_len=state.config.model.max_model_len,
            )
            for name in state.args.served_model_names
        ]
    )
