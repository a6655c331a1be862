"""The offline API: ``LLM(model=...).generate(prompts, sampling_params)``."""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from metroline.engine.engine_args import EngineArgs
from metroline.engine.engine_core import EngineCore
from metroline.engine.input_processor import InputProcessor, ProcessedPrompt, PromptType
from metroline.engine.output_processor import OutputProcessor
from metroline.engine.outputs import RequestOutput
from metroline.engine.request import RequestStatus
from metroline.engine.sampling_params import SamplingParams
from metroline.engine.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)


class LLM:
    """A model loaded for offline batch generation, vLLM-shaped.

    ``generate`` adds every prompt, runs engine steps until all are done, and returns one
    :class:`RequestOutput` per prompt in input order. A bad prompt or parameter raises
    ``ValueError`` before anything is queued. A request that fails while it runs (a bug met
    by that request alone) comes back with ``error`` set and a sequence finished with
    reason "error"; the others are unaffected.
    """

    def __init__(
        self,
        model: str,
        tensor_parallel_size: int = 1,
        max_model_len: int | None = None,
        gpu_memory_utilization: float = 0.9,
        block_size: int = 16,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 8192,
        enable_prefix_caching: bool = True,
        kv_cache_memory_bytes: int | None = None,
        dtype: str = "auto",
        load_format: str = "auto",
        enforce_eager: bool = False,
        seed: int = 0,
        device: str = "auto",
        async_scheduling: bool | None = None,
        mixed_step_graphs: bool | None = None,
    ) -> None:
        args = EngineArgs(
            model=model,
            tensor_parallel_size=tensor_parallel_size,
            max_model_len=max_model_len,
            gpu_memory_utilization=gpu_memory_utilization,
            block_size=block_size,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            enable_prefix_caching=enable_prefix_caching,
            kv_cache_memory_bytes=kv_cache_memory_bytes,
            dtype=dtype,
            load_format=load_format,
            enforce_eager=enforce_eager,
            seed=seed,
            device=device,
            async_scheduling=async_scheduling,
            mixed_step_graphs=mixed_step_graphs,
        )
        self.config = args.create_config()
        model_config = self.config.model
        self.tokenizer = load_tokenizer(model_config.path) if model_config.has_tokenizer else None
        self.engine_core = EngineCore(self.config)
        self.input_processor = InputProcessor(self.config, self.tokenizer)
        self._request_counter = itertools.count()

    def get_tokenizer(self) -> Any:
        return self.tokenizer

    def shutdown(self) -> None:
        """Free the device memory (weights, KV pool, CUDA graphs) at once, stop worker
        processes (TP > 1) and release the process group. Idempotent; the engine serves no
        request afterwards."""
        core = getattr(self, "engine_core", None)
        if core is not None:
            core.shutdown()

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
            params_list = [SamplingParams()] * len(prompt_list)
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
            with tqdm(
                total=len(processed), desc="generate", unit="req", disable=not use_tqdm
            ) as progress:
                timer = core.host_timer
                while outputs.has_unfinished_requests():
                    core_outputs = core.step()
                    started = timer.start()
                    step = outputs.process_outputs(core_outputs)
                    timer.stop("llm.process_outputs", started)
                    if step.stopped_core_requests:
                        core.finish_requests(
                            step.stopped_core_requests, RequestStatus.FINISHED_STOPPED
                        )
                    if step.aborted_core_requests:
                        core.abort_requests(step.aborted_core_requests)
                    for result in step.request_outputs:
                        if result.error is not None:
                            logger.error("request %s failed: %s", result.request_id, result.error)
                        results[order[result.request_id]] = result
                        progress.update(1)
        except BaseException:
            for p in processed:
                core.abort_requests(outputs.abort_request(p.request_id))
            raise
        return [r for r in results if r is not None]


def _as_prompt_list(prompts: Any) -> list[PromptType]:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    if isinstance(prompts, (list, tuple)):
        if prompts and all(isinstance(t, int) and not isinstance(t, bool) for t in prompts):
            return [list(prompts)]
        return list(prompts)
    raise ValueError(f"prompts must be a string, token ids, or a list of them; got {type(prompts)}")
