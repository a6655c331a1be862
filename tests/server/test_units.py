"""The server's pure parts, without processes: stream deltas, readiness hysteresis, streamed
text before stop strings, the command line, drain timeout."""

from __future__ import annotations

import asyncio
import logging

import pytest

from metroline.engine.checkpoint import load_tokenizer
from metroline.engine.cli import build_parser
from metroline.engine.client.output_processor import OutputProcessor
from metroline.engine.config import EngineArgs
from metroline.engine.messages import EngineCoreOutput, SchedulerStats
from metroline.engine.outputs import CompletionOutput
from metroline.engine.sampling_params import SamplingParams
from metroline.engine.server.args import ServerArgs
from metroline.engine.server.errors import _validation_param
from metroline.engine.server.logprobs import token_bytes
from metroline.engine.server.readiness import Readiness
from metroline.engine.server.state import ServerState
from metroline.engine.server.streaming import ChoiceCursor


def stats(kv: float, waiting: int = 0) -> SchedulerStats:
    return SchedulerStats(1, waiting, kv, 0, 0, 0)


def test_stream_deltas_add_up_to_the_final_output():
    cursor = ChoiceCursor()
    texts = ["", "de", "def", "def f", "def f(", "def f(x)"]
    sent_text, sent_tokens = "", []
    for step, text in enumerate(texts):
        finished = step == len(texts) - 1
        output = CompletionOutput(0, text, list(range(step + 1)), finish_reason=(
            "length" if finished else None))  # fmt: skip
        delta = cursor.advance(output)
        if delta is not None:
            assert delta.text_offset == len(sent_text)
            sent_text += delta.text
            sent_tokens += delta.token_ids
            assert (delta.finish_reason is not None) == finished
    assert sent_text == texts[-1] and sent_tokens == list(range(len(texts)))
    assert cursor.advance(CompletionOutput(0, "def f(x)", [0], finish_reason="length")) is None


def test_readiness_hysteresis():
    readiness = Readiness(kv_high=0.9, kv_low=0.7, max_waiting=4, loaded=True)
    assert readiness.status() == (True, "ready")
    for kv, waiting, ready in [
        (0.5, 0, True),
        (0.91, 0, False),  # above the high watermark
        (0.85, 0, False),  # between the marks: stays unready
        (0.7, 0, True),  # at the low watermark: ready again
        (0.85, 0, True),  # between the marks: stays ready
        (0.5, 5, False),  # queue above its limit
        (0.5, 3, False),  # above half the limit
        (0.5, 2, True),
    ]:
        readiness.update(stats(kv, waiting))
        assert readiness.status()[0] is ready, (kv, waiting)
    readiness.draining = True
    assert readiness.status() == (False, "draining: the server is shutting down")
    assert not Readiness(0.9, 0.8).status()[0]  # still loading


def test_streamed_text_holds_back_a_possible_stop_string(tiny_checkpoint):
    tokenizer = load_tokenizer(tiny_checkpoint("llama"))
    ids = tokenizer("x = 1 # END of it").input_ids
    processor = OutputProcessor(tokenizer)
    params = SamplingParams(stop=["# END"], max_tokens=50)
    processor.add_request("r", None, [5], [("r", params)], stream=True)
    shown = []
    for token in ids:
        result = processor.process_outputs([EngineCoreOutput("r", [token])])
        for output in result.request_outputs:
            shown.append(output.outputs[0].text)
        if result.stopped_core_requests:
            break
    assert shown[-1] == "x = 1 "
    assert all(shown[-1].startswith(text) for text in shown)
    assert not any("#" in text for text in shown)


OPERATOR_FLAGS = (
    "serve /models/llama --tensor-parallel-size 2 --max-model-len 4096 "
    "--gpu-memory-utilization 0.9 --max-num-seqs 128 --max-num-batched-tokens 8192 "
    "--block-size 16 --dtype bfloat16 --served-model-name llama --host 0.0.0.0 --port 8000 "
    "--ready-kv-threshold 0.9 --no-enable-prefix-caching"
)


def test_command_line_takes_the_operator_flags():
    ns = build_parser().parse_args(OPERATOR_FLAGS.split())
    assert (ns.tensor_parallel_size, ns.max_model_len, ns.max_num_seqs) == (2, 4096, 128)
    assert ns.dtype == "bfloat16" and ns.served_model_name == ["llama"]
    assert ns.enable_prefix_caching is False and ns.ready_kv_threshold == 0.9
    more = build_parser().parse_args(
        [
            "serve",
            "demo",
            "--api-key",
            "k",
            "--max-waiting-requests",
            "5",
            "--drain-timeout",
            "3",
            "--enforce-eager",
            "--kv-cache-memory-bytes",
            "1000",
            "--load-format",
            "dummy",
            "--seed",
            "3",
            "--device",
            "cpu",
            "--ready-max-waiting",
            "9",
        ]
    )
    assert (more.api_key, more.max_waiting_requests, more.drain_timeout) == ("k", 5, 3.0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(ready_kv_threshold=1.5), "--ready-kv-threshold"),
        (dict(ready_kv_threshold=0.5, ready_kv_low_watermark=0.6), "--ready-kv-low-watermark"),
        (dict(max_waiting_requests=-1), "--max-waiting-requests"),
        (dict(drain_timeout=-1), "--drain-timeout"),
        (dict(log_format="xml"), "--log-format"),
    ],
)
def test_server_args_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ServerArgs(served_model_names=("m",), **kwargs)


def test_validation_param_names():
    assert _validation_param(("body", "prompt", "constrained-str")) == "prompt"
    assert _validation_param(("body", "messages", 0, "role")) == "messages.0.role"
    assert _validation_param(("body", "stop", "list[constrained-str]", 2)) == "stop.2"


class _StuckEngine:
    aborted = False

    def abort_all(self) -> None:
        self.aborted = True


def test_drain_timeout_aborts_what_is_left_and_exits_zero(tiny_checkpoint):
    config = EngineArgs(model=str(tiny_checkpoint("llama"))).create_config()
    codes: list[int] = []
    args = ServerArgs(served_model_names=("m",), drain_timeout=0.2, log_level=logging.INFO)
    state = ServerState(config, args, request_exit=codes.append)
    state.engine = _StuckEngine()
    state.in_flight = 1  # a request that never finishes

    async def run() -> None:
        state.begin_drain()
        assert state.readiness.status()[0] is False
        for _ in range(100):
            if codes:
                break
            if state.engine.aborted:
                state.in_flight = 0  # the aborted request's response ends
            await asyncio.sleep(0.05)

    asyncio.run(run())
    assert state.engine.aborted and codes == [0]


def test_logprob_token_bytes_rebuild_the_text(tiny_checkpoint):
    tokenizer = load_tokenizer(tiny_checkpoint("llama"))
    text = "héllo wörld ✓ → 日本"
    ids = tokenizer(text).input_ids
    pieces = [token_bytes(tokenizer, i, tokenizer.decode([i])) for i in ids]
    assert any(tokenizer.decode([i]) == "\ufffd" for i in ids)  # split characters occur
    assert b"".join(bytes(p) for p in pieces) == text.encode()
