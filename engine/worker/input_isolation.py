"""Building a step's inputs so that a request whose inputs cannot be built fails alone."""

from __future__ import annotations

import logging
from collections.abc import Callable

from .. import faults
from ..messages import SchedulerOutput
from .step_inputs import StepInputs

logger = logging.getLogger(__name__)


def build_isolating(
    scheduled: SchedulerOutput, build: Callable[[SchedulerOutput], StepInputs]
) -> tuple[StepInputs | None, dict[str, str]]:
    """The step's inputs (``build(scheduled)``), and the requests left out because theirs
    could not be built (request id -> reason); None when every request failed. Only when
    the whole step fails is each request tried alone, to find the culprits; every rank finds
    the same ones (their states and plans are alike). Faults that poison the engine, and a
    whole-step failure no single request explains, are raised."""
    try:
        return build(scheduled), {}
    except Exception as error:
        if faults.poisons_engine(error):
            raise
        whole_step_error = error
    failed: dict[str, str] = {}
    everyone = set(scheduled.num_scheduled_tokens)
    for request_id in scheduled.num_scheduled_tokens:
        try:
            build(scheduled.without(everyone - {request_id}))
        except Exception as error:
            if faults.poisons_engine(error):
                raise
            failed[request_id] = f"building its inputs failed: {faults.describe(error)}"
    if not failed:  # no single request explains it
        raise whole_step_error
    logger.error("step inputs failed for %d request(s): %s", len(failed), failed)
    remaining = scheduled.without(failed)
    if remaining.is_empty:
        return None, failed
    return build(remaining), failed
