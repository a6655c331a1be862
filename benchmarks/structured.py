"""Structured outputs (W7, benchmarks/README.md): what grammars cost on W1's prompts.

``python -P benchmarks/structured.py --model llama3-8b [--schemas bounded|long] [--out DIR]``

The shape gets a byte-level tokenizer of its vocabulary size (bytelevel_tokenizer.py).
1. Grammar compile time per schema against that tokenizer (cold, one at a time).
2. W1's prompts, request ``i`` with schema ``i % 20`` (structured_schemas.py; ``long``: the
   schemas of many-item arrays), greedy, no ``ignore_eos``, W1's output length as a cap:
   output tokens/s, and every output that stopped is checked to parse and validate.
3. The same prompts without grammars, ``max_tokens`` set to each constrained output's
   length and ``ignore_eos``: output tokens/s. The cost is 1 - (2) / (3).
Both runs start after a warm-up that compiled every schema (a serving engine's cache);
prefix caching is off (the second pass would find the first pass's prompts cached).
Prints one table last and writes a JSON record.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bytelevel_tokenizer import write_byte_level_tokenizer
from common import environment, gpu_slug
from records import save_record
from shapes import SHAPES, write_shape
from structured_schemas import LONG_SCHEMAS, SCHEMAS
from workloads import make_workload

from metroline.engine.config import EngineArgs
from metroline.engine.flags import add_flags, flag_values

logger = logging.getLogger("structured")

#: Engine settings the benchmark decides itself.
ENGINE_FLAGS_FIXED = ("model", "load_format")


def compile_seconds(shape_dir: Path, vocab_size: int, schemas: list[dict]) -> dict[str, Any]:
    """Cold compile time of each schema, and of reading the tokenizer for grammars."""
    import xgrammar

    from metroline.engine.checkpoint import load_tokenizer
    from metroline.engine.structured_outputs import StructuredOutputsParams, build_grammar

    started = time.perf_counter()
    info = xgrammar.TokenizerInfo.from_huggingface(load_tokenizer(shape_dir), vocab_size=vocab_size)
    tokenizer_s = time.perf_counter() - started
    compiler = xgrammar.GrammarCompiler(info, cache_enabled=False)
    seconds = []
    for schema in schemas:
        started = time.perf_counter()
        compiler.compile_grammar(build_grammar(StructuredOutputsParams(json=schema)))
        seconds.append(time.perf_counter() - started)
    ordered = sorted(seconds)
    return {
        "tokenizer_info_s": tokenizer_s,
        "per_schema_s": seconds,
        "median_s": ordered[len(ordered) // 2],
        "max_s": ordered[-1],
    }


def timed_generate(llm: Any, prompts: list[list[int]], params: list[Any]) -> tuple[list, float]:
    """Outputs and seconds; the run's engine steps and allocator retries go to the log."""
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
    retries = torch.cuda.memory_stats().get("num_alloc_retries", 0) if cuda else 0
    steps = llm.engine_core.stats().num_steps
    started = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    if cuda:
        torch.cuda.synchronize()
        retries = torch.cuda.memory_stats().get("num_alloc_retries", 0) - retries
    elapsed = time.perf_counter() - started
    steps = llm.engine_core.stats().num_steps - steps
    logger.info("%d steps, %d allocator retries in %.2f s", steps, retries, elapsed)
    return outputs, elapsed


def phase_seconds(after: dict[str, dict], before: dict[str, dict]) -> dict[str, float]:
    """Host seconds per phase between two reports of rank 0 (empty unless timing is on)."""
    return {
        phase: round(entry["total_s"] - before.get(phase, {}).get("total_s", 0.0), 4)
        for phase, entry in after.items()
    }


def run(shape_dir: Path, args: argparse.Namespace, schemas: list[dict]) -> dict[str, Any]:
    import jsonschema

    from metroline.engine import LLM, SamplingParams

    vocab = SHAPES[args.model]["vocab_size"]
    workload = make_workload("W1", vocab, args.num_requests)
    llm = LLM(
        model=str(shape_dir),
        load_format="dummy",
        **flag_values(args, EngineArgs, skip=ENGINE_FLAGS_FIXED),
    )

    def constrained(index: int, cap: int) -> SamplingParams:
        fields = {"json": schemas[index % len(schemas)]}
        return SamplingParams(temperature=0.0, max_tokens=cap, structured_outputs=fields)

    warm = make_workload("W1", vocab, 2 * len(schemas), seed=1)
    llm.generate(
        warm.prompts, [constrained(i, 64) for i in range(len(warm.prompts))], use_tqdm=False
    )
    params = [constrained(i, cap) for i, cap in enumerate(workload.output_lens)]
    core = llm.engine_core
    before = core.host_timings()[0]
    outputs, constrained_s = timed_generate(llm, workload.prompts, params)
    constrained_timings = phase_seconds(core.host_timings()[0], before)
    lengths = [len(o.outputs[0].token_ids) for o in outputs]
    stopped = invalid = 0
    for index, output in enumerate(outputs):
        choice = output.outputs[0]
        if choice.finish_reason != "stop":
            continue
        stopped += 1
        try:
            jsonschema.validate(json.loads(choice.text), schemas[index % len(schemas)])
        except (ValueError, jsonschema.ValidationError):
            invalid += 1
    plain = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in lengths]
    before = core.host_timings()[0]
    plain_outputs, plain_s = timed_generate(llm, workload.prompts, plain)
    plain_timings = phase_seconds(core.host_timings()[0], before)
    assert [len(o.outputs[0].token_ids) for o in plain_outputs] == lengths
    produced = sum(lengths)
    result = {
        "requests": len(outputs),
        "output_tokens": produced,
        "mean_output_tokens": produced / len(outputs),
        "stopped": stopped,
        "invalid_among_stopped": invalid,
        "constrained_s": constrained_s,
        "plain_s": plain_s,
        "constrained_output_tokens_per_s": produced / constrained_s,
        "plain_output_tokens_per_s": produced / plain_s,
        "cost": 1 - plain_s / constrained_s,
        "async_scheduling": llm.engine_core.async_scheduling,
        "grammar_compiles_in_engine_s": list(llm.engine_core.grammars.compile_seconds),
        # Host time by phase (METROLINE_HOST_TIMING=1), the core's and rank 0's runner's.
        "host_timings": {"constrained": constrained_timings, "plain": plain_timings},
    }
    llm.shutdown()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama3-8b", choices=sorted(SHAPES))
    parser.add_argument("--schemas", default="bounded", choices=["bounded", "long"])
    parser.add_argument("--num-requests", type=int, default=None)
    add_flags(
        parser.add_argument_group("engine"),
        EngineArgs,
        skip=ENGINE_FLAGS_FIXED,
        # Both passes send the same prompts: with prefix caching the second would skip
        # its prefills and look faster than it is.
        defaults={"dtype": "bfloat16", "max_model_len": 4096, "enable_prefix_caching": False},
    )
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    schemas = SCHEMAS if args.schemas == "bounded" else LONG_SCHEMAS
    shape = SHAPES[args.model]
    env = environment()
    with tempfile.TemporaryDirectory() as tmp:
        shape_dir = write_shape(args.model, Path(tmp) / args.model)
        write_byte_level_tokenizer(
            shape_dir, shape["vocab_size"], shape["bos_token_id"], shape["eos_token_id"]
        )
        compiles = compile_seconds(shape_dir, shape["vocab_size"], schemas)
        result = run(shape_dir, args, schemas)
    record = {
        "benchmark": "structured",
        "environment": env,
        "parameters": vars(args) | {"out": str(args.out)},
        "compile": compiles,
        "result": result,
    }
    path = save_record(
        args.out, ["structured", args.schemas, args.model, gpu_slug(env.get("gpu", "cpu"))], record
    )
    logger.info("wrote %s", path)
    print(f"\nstructured outputs, {args.model}, {env.get('gpu', 'cpu')}, schemas {args.schemas}")
    print(
        f"  compile per schema: median {compiles['median_s'] * 1e3:.1f} ms, "
        f"max {compiles['max_s'] * 1e3:.1f} ms; tokenizer {compiles['tokenizer_info_s']:.2f} s"
    )
    print(
        f"  requests {result['requests']}, mean output {result['mean_output_tokens']:.1f} "
        f"tokens, stopped {result['stopped']} (invalid {result['invalid_among_stopped']})"
    )
    print(
        f"  constrained {result['constrained_output_tokens_per_s']:,.0f} out tok/s, "
        f"plain {result['plain_output_tokens_per_s']:,.0f} out tok/s, "
        f"cost {result['cost'] * 100:.1f}%"
    )


if __name__ == "__main__":
    main()
