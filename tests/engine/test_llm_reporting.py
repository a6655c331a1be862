"""What ``LLM`` shows: its start-up lines without any logging set up (and each line once
when the user sets logging up), and a ``generate`` progress bar counted in tokens."""

from __future__ import annotations

import io
import re
import subprocess
import sys
import textwrap

from metroline.engine import LLM, SamplingParams
from metroline.engine.llm_reporting import GenerateProgress
from metroline.engine.messages import EngineCoreOutput
from metroline.engine.outputs import RequestOutput

from .conftest import make_prompts


def test_llm_logs_its_start_up_without_logging_configured(tiny_checkpoint):
    code = textwrap.dedent(
        f"""
        import logging, sys
        from metroline.engine import LLM
        path = {str(tiny_checkpoint("llama"))!r}
        LLM(model=path, kv_cache_memory_bytes=2**22)
        print("--- configured", file=sys.stderr, flush=True)
        logging.basicConfig(stream=sys.stdout, level=logging.INFO, format="ROOT %(message)s")
        LLM(model=path, kv_cache_memory_bytes=2**22)
        """
    )
    result = subprocess.run(
        [sys.executable, "-P", "-c", code], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    before, after = result.stderr.split("--- configured")
    ready = re.findall(r"LLM ready: .*", before)
    assert len(ready) == 1, before
    assert re.search(
        r"\(LlamaForCausalLM, float32, TP=1\), weights \d+\.\d\d GiB loaded in \d+\.\d s; "
        r"KV cache \d+ tokens \(\d+ blocks of 16\), maximum concurrency at max_model_len 512: "
        r"\d+\.\d\dx",
        ready[0],
    ), ready[0]
    assert "metroline.engine.worker.worker: loaded" in before
    # Once the user configures logging, each line comes once, through their handler only.
    assert "LLM ready" not in after
    assert len(re.findall(r"^ROOT LLM ready: ", result.stdout, re.MULTILINE)) == 1


def _output(request_id: str, tokens: int, finished: bool = False) -> EngineCoreOutput:
    return EngineCoreOutput(
        request_id, list(range(tokens)), finish_reason="stop" if finished else None
    )


def test_progress_advances_per_token_and_ends_full():
    budgets = {"a": [("a", 4, 10)], "b": [("0_b", 3, 6), ("1_b", 3, 6)]}
    progress = GenerateProgress(budgets, file=io.StringIO())
    assert progress.bar.total == 22
    progress.update([_output("a", 1), _output("0_b", 1), _output("1_b", 1)], [])
    assert (progress.bar.n, progress.input_tokens, progress.output_tokens) == (3, 10, 3)
    progress.update([_output("a", 1, finished=True), _output("0_b", 1)], [_done("a")])
    assert (progress.bar.n, progress.bar.total) == (5, 14)  # "a" used 2 of its 10
    progress.update([_output("a", 1), _output("0_b", 4), _output("1_b", 5)], [_done("b")])
    assert progress.bar.n == progress.bar.total == 14  # a token after a's end is dropped
    assert re.search(r"input \S+ tok/s, output \S+ tok/s, requests 2/2", str(progress.bar))
    progress.close()


def _done(request_id: str) -> RequestOutput:
    return RequestOutput(request_id, None, [], [], finished=True)


def test_generate_bar_counts_generated_tokens(tiny_checkpoint, capsys):
    llm = LLM(model=str(tiny_checkpoint("llama")), kv_cache_memory_bytes=2**22)
    capsys.readouterr()
    outputs = llm.generate(make_prompts([5, 9, 3]), SamplingParams(temperature=0, max_tokens=7))
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    final = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    assert f" {generated}/{generated} " in final, final
    assert "tok/s" in final and "requests 3/3" in final, final
