"""The offline API: ``LLM(model=...).generate(prompts, sampling_params)``."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from collections.abc import Sequence
from typing import Any

from .chat_templates import as_conversations, check_template_text, render_chat
from .checkpoint import load_tokenizer
from .client.input_processor import InputProcessor, ProcessedPrompt, PromptType
from .client.output_processor import OutputProcessor
from .config import EngineArgs
from .core.engine_core import EngineCore
from .generation_defaults import default_sampling_params
from .llm_reporting import GenerateProgress, attach_default_log_handler, ready_line
from .long_lived_heap import (
    freeze_long_lived_heap,
    release_long_lived_heap,
    settle_long_lived_heap,
    thaw_long_lived_heap,
)
from .messages import RequestStatus
from .outputs import RequestOutput
from .sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class LLM:
    """A model loaded for offline batch generation, vLLM-shaped.

    ``generate`` adds every prompt, runs engine steps until all are done, and returns one
    :class:`RequestOutput` per prompt in input order. A bad prompt or parameter raises
    ``ValueError`` before anything is queued. A request that fails while it runs (a bug met
    by that request alone) comes back with ``error`` set and a sequence finished with
    reason "error"; the others are unaffected.
    """

    def __init__(self, model: str, **kwargs: Any) -> None:
        """``kwargs`` are :class:`~metroline.engine.config.EngineArgs`' fields (the same knobs
        as ``metroline serve``'s flags, with the same defaults); an unknown one is a
        ``TypeError`` naming it."""
        known = {field.name for field in dataclasses.fields(EngineArgs)} - {"model"}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(
                f"LLM() got unknown engine arguments {unknown}; known: {', '.join(sorted(known))}"
            )
        attach_default_log_handler()
        self._holds_heap = False
        # An engine dropped earlier without shutdown() may sit frozen in a reference cycle:
        # back to the collector, so the collection before loading frees its memory.
        thaw_long_lived_heap()
        try:
            args = EngineArgs(model=model, **kwargs)
            self.config = args.create_config()
            model_config = self.config.model
            self.tokenizer = (
                load_tokenizer(model_config.tokenizer_path) if model_config.has_tokenizer else None
            )
            self.engine_core = EngineCore(self.config)
        except BaseException:
            settle_long_lived_heap()  # the engines still alive are frozen again
            raise
        logger.info("%s", ready_line(self.engine_core))
        self.input_processor = InputProcessor(self.config, self.tokenizer)
        self._request_counter = itertools.count()
        # The engine lives in this process: its model and graphs (and whatever the caller
        # holds now) leave the collector's walks, which would stall generate's steps.
        freeze_long_lived_heap()
        self._holds_heap = True

    def get_default_sampling_params(self) -> SamplingParams:
        """The sampling parameters ``generate`` uses when given none: the model's
        ``generation_config.json`` defaults (see :mod:`metroline.engine.generation_defaults`;
        ``generation_config="vllm"`` leaves them out), SamplingParams' own for the rest."""
        return default_sampling_params(self.config.model.generation_defaults)

    def get_tokenizer(self) -> Any:
        return self.tokenizer

    def shutdown(self) -> None:
        """Free the device memory (weights, KV pool, CUDA graphs) at once, stop worker
        processes (TP > 1) and release the process group. Idempotent; the engine serves no
        request afterwards."""
        core = getattr(self, "engine_core", None)
        if core is not None:
            core.shutdown()  # its workers thaw the heap before they collect
        if getattr(self, "_holds_heap", False):
            self._holds_heap = False
            release_long_lived_heap()
        else:  # shut down before: whatever thawed since, the live engines stay frozen
            settle_long_lived_heap()

    def __del__(self) -> None:
        self.shutdown()

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        prompt_list = _as_prompt_list(prompts)
        if sampling_params is None:
            params_list = [self.get_default_sampling_params()] * len(prompt_list)
        elif isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(prompt_list)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompt_list):
                raise ValueError(
                    f"got {len(params_list)} sampling params for {len(prompt_list)} prompts"
                )
        now = time.monotonic()
        processed: list[ProcessedPrompt] = [
            self.input_processor.process(str(next(self._request_counter)), prompt, params, now)
            for prompt, params in zip(prompt_list, params_list)
        ]
        return self._run(processed, use_tqdm)

    def chat(
        self,
        messages: Sequence[Any],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        chat_template: str | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
    ) -> list[RequestOutput]:
        """``generate`` on one conversation (a list of ``{"role", "content"}`` dicts) or a
        list of them: each is rendered by the chat template (``chat_template``, the template
        text, else the tokenizer's) as ``/v1/chat/completions`` renders it, and tokenised
        without adding special tokens (the template writes them). A conversation that
        cannot be rendered raises ``ValueError``."""
        if chat_template is not None:
            check_template_text(chat_template, "chat_template")
        texts = [
            render_chat(
                self.tokenizer,
                conversation,
                chat_template=chat_template,
                chat_template_kwargs=chat_template_kwargs,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
                template_option="LLM.chat(chat_template=...)",
            )
            for conversation in as_conversations(messages)
        ]
        limit = self.config.model.max_model_len - 1
        encode = self.input_processor.encode
        prompts = [{"prompt_token_ids": encode(t, False, limit)} for t in texts]
        outputs = self.generate(prompts, sampling_params, use_tqdm)
        for output, text in zip(outputs, texts):
            output.prompt = text
        return outputs

    def _run(self, processed: list[ProcessedPrompt], use_tqdm: bool) -> list[RequestOutput]:
        core = self.engine_core
        outputs = OutputProcessor(self.tokenizer)
        order = {p.request_id: i for i, p in enumerate(processed)}
        try:
            for p in processed:
                outputs.add_request(
                    p.request_id,
                    p.prompt,
                    p.prompt_token_ids,
                    [(c.request_id, c.sampling_params) for c in p.core_requests],
                )
                for core_request in p.core_requests:
                    core.add_request(core_request)
            results: list[RequestOutput | None] = [None] * len(processed)
            with GenerateProgress(self._token_budgets(processed), use_tqdm) as progress:
                timer = core.host_timer
                while outputs.has_unfinished_requests():
                    core_outputs = core.step()
                    with timer.phase("llm.process_outputs"):
                        step = outputs.process_outputs(core_outputs)
                    if step.stopped_core_requests:
                        core.finish_requests(
                            step.stopped_core_requests, RequestStatus.FINISHED_STOPPED
                        )
                    if step.aborted_core_requests:
                        core.finish_requests(step.aborted_core_requests)
                    for result in step.request_outputs:
                        if result.error is not None:
                            logger.error("request %s failed: %s", result.request_id, result.error)
                        results[order[result.request_id]] = result
                    progress.update(core_outputs, step.request_outputs)
        except BaseException:
            for p in processed:
                core.finish_requests(outputs.abort_request(p.request_id))
            raise
        return [r for r in results if r is not None]

    def _token_budgets(
        self, processed: list[ProcessedPrompt]
    ) -> dict[str, list[tuple[str, int, int]]]:
        """Per request, its core requests' (id, prompt length, most tokens they generate)."""
        max_len = self.config.model.max_model_len
        budgets = {}
        for p in processed:
            room = max_len - len(p.prompt_token_ids)
            limit = p.params.max_tokens
            budget = room if limit is None else min(room, limit)
            budgets[p.request_id] = [
                (c.request_id, len(p.prompt_token_ids), budget) for c in p.core_requests
            ]
        return budgets


def _as_prompt_list(prompts: Any) -> list[PromptType]:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    if isinstance(prompts, (list, tuple)):
        if prompts and all(isinstance(t, int) and not isinstance(t, bool) for t in prompts):
            return [list(prompts)]
        return list(prompts)
    raise ValueError(f"prompts must be a string, token ids, or a list of them; got {type(prompts)}")
