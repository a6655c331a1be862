"""When a request stops: checked after each token it takes, and before scheduling a request
whose tokens are still in flight."""

from __future__ import annotations

from ..messages import RequestStatus
from .request import Request


def stop_status(request: Request, token: int, max_model_len: int) -> RequestStatus | None:
    """The status ``request`` finishes with now that it took ``token`` (its last output
    token), or None: EOS and stop tokens once ``min_tokens`` are out (a stop token is kept as
    the stop reason), then ``max_tokens``, then ``max_model_len``."""
    params = request.sampling_params
    if request.num_output_tokens >= params.min_tokens:
        if not params.ignore_eos and token in request.eos_token_ids:
            return RequestStatus.FINISHED_STOPPED
        if token in params.stop_token_ids:
            request.stop_reason = token
            return RequestStatus.FINISHED_STOPPED
    if params.max_tokens is not None and request.num_output_tokens >= params.max_tokens:
        return RequestStatus.FINISHED_LENGTH
    if request.num_tokens >= max_model_len:
        return RequestStatus.FINISHED_LENGTH
    return None


def at_limit(request: Request, max_model_len: int) -> bool:
    """Tokens in flight already take the request to max_tokens or max_model_len."""
    pending = request.num_pending_samples
    if not pending:
        return False
    max_tokens = request.sampling_params.max_tokens
    if max_tokens is not None and request.num_output_tokens + pending >= max_tokens:
        return True
    return request.num_tokens + pending >= max_model_len
