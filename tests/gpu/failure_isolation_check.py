"""GPU check of per-request failure isolation (engine/faults.py) on CUDA, with asynchronous
scheduling and CUDA graphs as served: a fault in one request's inputs or sampling, or after
the batch drew its random numbers, fails that request alone, and the others (greedy and
seeded) get exactly the tokens of the fault-free run.

Run on a CUDA machine from the repository root: ``python -P tests/gpu/failure_isolation_check.py``.
Prints a table last and writes JSON to $OUT (or the working directory).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "gpu")]

from conftest import write_tiny_checkpoint  # noqa: E402
from gpu_helpers import release, report  # noqa: E402

import metroline.engine.worker.model_runner as model_runner  # noqa: E402
from metroline.engine import LLM, SamplingParams, faults  # noqa: E402

TINY = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2)


def params_for(index: int) -> SamplingParams:
    if index % 2 == 0:
        return SamplingParams(temperature=0, max_tokens=24)
    return SamplingParams(temperature=0.8, top_k=20, seed=100 + index, max_tokens=24, logprobs=2)


def main() -> None:
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none (CPU)"
    results: dict[str, object] = {"gpu": gpu}
    with tempfile.TemporaryDirectory() as tmp:
        path = write_tiny_checkpoint(Path(tmp) / "llama", "llama", **TINY)
        llm = LLM(model=str(path), max_model_len=256)
        results["async_scheduling"] = llm.engine_core.async_scheduling
        generator = torch.Generator().manual_seed(0)
        prompts = [
            torch.randint(2, 512, (n,), generator=generator).tolist() for n in (5, 17, 31, 48)
        ]

        def run():
            params = [params_for(i) for i in range(len(prompts))]
            return llm.generate(prompts, params, use_tqdm=False)

        def next_id() -> int:
            return next(llm._request_counter) + 1

        expected = [o.outputs[0].token_ids for o in run()]
        real_wanted = model_runner._wanted_logprobs
        for case in ("inputs", "sampling", "after-draws"):
            target = str(next_id() + 3)  # a seeded request with log-probs
            if case == "after-draws":

                def fail(states, *args, target=target):
                    if any(s.request_id == target for s in states):
                        raise RuntimeError("log-probs failed")
                    return real_wanted(states, *args)

                model_runner._wanted_logprobs = fail
            else:
                faults._FAULTS, faults.ACTIVE = {case: target}, True
            try:
                outputs = run()
            finally:
                faults._FAULTS, faults.ACTIVE = {}, False
                model_runner._wanted_logprobs = real_wanted
            others = all(
                outputs[i].error is None and outputs[i].outputs[0].token_ids == expected[i]
                for i in (0, 1, 2)
            )
            results[f"{case}: target failed"] = outputs[3].error is not None
            results[f"{case}: others' tokens equal"] = others
        again = [o.outputs[0].token_ids for o in run()]
        results["after the faults: tokens equal"] = again == expected
        results["nothing left running"] = not llm.engine_core.has_unfinished_requests()
        release(llm)
    report(results, "failure_isolation_check", "failure isolation on CUDA")
    if not all(v for k, v in results.items() if k not in ("gpu", "async_scheduling")):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
