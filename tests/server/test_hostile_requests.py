"""Hostile requests: no single request can crash, stall or exhaust the server.

One real server (tiny llama, ``--max-model-len 64``, an API key) gets every case in the table
below, on both generation endpoints, streaming and not where that takes another path. Each
case must be answered with a 4xx in OpenAI's error shape (``param`` naming the field where the
contract names one); after each case ``/health`` must be 200 and a 1-token completion must
succeed. A case that leaves the server dead fails, and the next case gets a fresh server, so
that one fatal request does not hide what the others do.

The limits under test are the contract's defaults: ``--max-request-bytes`` 16 MiB (413 above,
also when chunked), ``--max-sequences-per-request`` 256 (prompts x ``n``), token ids inside the
vocabulary, bounded stop lists, message lists and nesting.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from .conftest import API_KEY, MODEL_NAME, ServerProcess

#: The tiny checkpoint's vocabulary (tests/conftest.py VOCAB_SIZE): ids >= this are outside it.
VOCAB_SIZE = 512
MAX_MODEL_LEN = 64
#: The contract's defaults for --max-request-bytes and --max-sequences-per-request.
MAX_REQUEST_BYTES = 16 * 2**20
MAX_SEQUENCES = 256
SERVER_ARGS = (
    "--served-model-name", MODEL_NAME,
    "--max-model-len", str(MAX_MODEL_LEN),
    "--kv-cache-memory-bytes", str(4 * 2**20),
    "--api-key", API_KEY,
)  # fmt: skip
#: Seconds any one exchange may take before the case counts as a stall.
TIMEOUT_S = 30.0
#: Seconds to wait for an answer that must come before the (never sent) rest of the body.
EARLY_ANSWER_TIMEOUT_S = 10.0
AUTH = {"Authorization": f"Bearer {API_KEY}"}

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
ENDPOINTS = {"cmpl": COMPLETIONS, "chat": CHAT}
BASE: dict[str, dict[str, Any]] = {
    COMPLETIONS: {"model": MODEL_NAME, "prompt": "hi", "max_tokens": 1},
    CHAT: {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1},
}
#: A field value meaning "leave this field out of the body".
DROP = object()


class Lit:
    """A JSON token written as is (``NaN``, ``Infinity``, ``1e400``: not Python floats)."""

    def __init__(self, text: str) -> None:
        self.text = text


NAN, INF, NEG_INF, OVERFLOW = Lit("NaN"), Lit("Infinity"), Lit("-Infinity"), Lit("1e400")


def encode(value: Any) -> bytes:
    """JSON with :class:`Lit` tokens spliced in where they stand."""
    literals: list[Lit] = []

    def default(obj: Any) -> Any:
        if isinstance(obj, Lit):
            literals.append(obj)
            return f"\x00LIT{len(literals) - 1}\x00"
        raise TypeError(type(obj))

    text = json.dumps(value, default=default, allow_nan=True)
    for index, literal in enumerate(literals):
        text = text.replace(f'"\\u0000LIT{index}\\u0000"', literal.text)
    return text.encode("utf-8", "surrogatepass")


@dataclass(frozen=True)
class Case:
    id: str
    path: str
    #: The JSON body (see :func:`encode`), or ``raw`` bytes sent as they are.
    body: Any = None
    raw: bytes | None = None
    #: Header changes: a value of None removes the header.
    headers: dict[str, str | None] = field(default_factory=dict)
    status: int = 400
    #: The ``param`` the contract names (or alternatives); ``param.N...`` counts as naming it.
    #: None: not checked beyond its type.
    param: str | tuple[str, ...] | None = None
    #: Also require ``code`` to be a string (not null).
    code_required: bool = False
    #: "httpx"; or over a plain socket: "sized" (Content-Length), "chunked"
    #: (Transfer-Encoding: chunked, no Content-Length), "declared" (``raw``, if any, as the
    #: start of a body of ``declared_length`` bytes whose rest never comes).
    transport: str = "httpx"
    declared_length: int = 0

    def payload(self) -> bytes:
        return self.raw if self.raw is not None else encode(self.body)


def body_with(path: str, **fields: Any) -> dict[str, Any]:
    body = {**BASE[path], **fields}
    return {k: v for k, v in body.items() if v is not DROP}


def cmpl(label: str, status: int = 400, param=None, **fields: Any) -> Case:
    return Case(
        f"cmpl-{label}", COMPLETIONS, body_with(COMPLETIONS, **fields), status=status, param=param
    )


def chat(label: str, status: int = 400, param=None, **fields: Any) -> Case:
    return Case(f"chat-{label}", CHAT, body_with(CHAT, **fields), status=status, param=param)


def both(label: str, param=None, status: int = 400, **fields: Any) -> list[Case]:
    """The same sampling fields on both endpoints."""
    return [cmpl(label, status, param, **fields), chat(label, status, param, **fields)]


def raw_both(label: str, raw: bytes, status: int = 400, **options: Any) -> list[Case]:
    return [
        Case(f"{name}-{label}", path, raw=raw, status=status, **options)
        for name, path in ENDPOINTS.items()
    ]


USER = {"role": "user", "content": "hi"}
#: A body just over the byte limit: valid JSON whose padding sits in a string field.
_PADDING = MAX_REQUEST_BYTES + 1024


def oversized(path: str) -> bytes:
    return encode(body_with(path, user="x" * _PADDING))


def multipart() -> bytes:
    part = 'Content-Disposition: form-data; name="{}"\r\n\r\n{}\r\n'
    return (
        f"--xyzzy\r\n{part.format('model', MODEL_NAME)}"
        f"--xyzzy\r\n{part.format('prompt', 'hi')}--xyzzy--\r\n"
    ).encode()


DEEP = 100_000  # thousands of nested brackets, and then some

# fmt: off
CASES: list[Case] = [
    # --- integers of huge magnitude -------------------------------------------------------
    *both("top_k=2**63", "top_k", top_k=2**63),  # killed the engine core
    *both("top_k=2**64", "top_k", top_k=2**64),
    *both("top_k=10**100", "top_k", top_k=10**100),
    *both("top_k=-2**63", "top_k", top_k=-(2**63)),
    *both("n=2**63", "n", n=2**63),
    *both("n=10**100", "n", n=10**100),
    *both("n=-2**64", "n", n=-(2**64)),
    cmpl("max_tokens=2**63", param="max_tokens", max_tokens=2**63),
    cmpl("max_tokens=-2**63", param="max_tokens", max_tokens=-(2**63)),
    chat("max_tokens=2**64", param="max_tokens", max_tokens=2**64),
    chat("max_completion_tokens=10**100", param="max_completion_tokens",
         max_completion_tokens=10**100),
    *both("min_tokens=2**63", "min_tokens", min_tokens=2**63),
    cmpl("min_tokens=-2**63", param="min_tokens", min_tokens=-(2**63)),
    *both("seed=2**64", "seed", seed=2**64),
    *both("seed=10**100", "seed", seed=10**100),
    cmpl("seed=-2**64", param="seed", seed=-(2**64)),
    cmpl("logprobs=2**63", param="logprobs", logprobs=2**63),
    cmpl("logprobs=-2**63", param="logprobs", logprobs=-(2**63)),
    chat("top_logprobs=2**64", param="top_logprobs", logprobs=True, top_logprobs=2**64),
    cmpl("best_of=2**63", param="best_of", best_of=2**63),
    # --- token ids outside the vocabulary ------------------------------------------------
    *both("stop_token_ids=[vocab]", "stop_token_ids", stop_token_ids=[VOCAB_SIZE]),
    *both("stop_token_ids=[2**63]", "stop_token_ids", stop_token_ids=[2**63]),
    cmpl("stop_token_ids=[2**64]", param="stop_token_ids", stop_token_ids=[2**64]),
    cmpl("stop_token_ids=[10**100]", param="stop_token_ids", stop_token_ids=[10**100]),
    cmpl("stop_token_ids=[2**31]", param="stop_token_ids", stop_token_ids=[2**31]),
    *both("stop_token_ids=[-1]", "stop_token_ids", stop_token_ids=[-1]),
    cmpl("prompt=[vocab]", param="prompt", prompt=[VOCAB_SIZE]),
    cmpl("prompt=[2**63]", param="prompt", prompt=[2**63]),
    cmpl("prompt=[10**100]", param="prompt", prompt=[10**100]),
    cmpl("prompt=[-1]", param="prompt", prompt=[-1]),
    cmpl("prompt=[[1],[vocab]]", param="prompt", prompt=[[1], [VOCAB_SIZE]]),
    # --- NaN and infinities (JSON extensions) and overflowing numbers ---------------------
    *both("temperature=NaN", "temperature", temperature=NAN),
    *both("top_p=Infinity", "top_p", top_p=INF),
    *both("presence_penalty=-Infinity", "presence_penalty", presence_penalty=NEG_INF),
    *both("frequency_penalty=1e400", "frequency_penalty", frequency_penalty=OVERFLOW),
    *both("repetition_penalty=NaN", "repetition_penalty", repetition_penalty=NAN),
    cmpl("min_p=Infinity", param="min_p", min_p=INF),
    cmpl("temperature=1e400", param="temperature", temperature=OVERFLOW),
    *both("n=NaN", "n", n=NAN),
    cmpl("max_tokens=Infinity", param="max_tokens", max_tokens=INF),
    *both("top_k=-Infinity", "top_k", top_k=NEG_INF),
    cmpl("seed=NaN", param="seed", seed=NAN),
    cmpl("logprobs=NaN", param="logprobs", logprobs=NAN),
    cmpl("prompt=[1,NaN]", param="prompt", prompt=[1, NAN]),
    cmpl("stop_token_ids=[Infinity]", param="stop_token_ids", stop_token_ids=[INF]),
    # --- stop strings: too many, too long, empty -----------------------------------------
    *both("stop=20000-strings", "stop", stop=[f"s{i}" for i in range(20_000)]),
    *both("stop=1MB-string", "stop", stop="ab" * 500_000),
    cmpl("stop=[1MB-string]", param="stop", stop=["ab" * 500_000]),
    cmpl("stop=empty", param="stop", stop=""),
    # --- sequences per request: prompts x n above 256 ------------------------------------
    cmpl("n=128x3-prompts", param=("n", "prompt"), n=128, prompt=["a", "b", "c"]),
    cmpl("1000-prompts", param="prompt", prompt=["a"] * 1000),
    cmpl("300-token-prompts", param="prompt", prompt=[[1]] * 300),
    *both("n=257", "n", n=MAX_SEQUENCES + 1),
    # --- prompt: nested lists, wrong types, null, empty -----------------------------------
    cmpl("prompt=[[[1]]]", param="prompt", prompt=[[[1]]]),
    cmpl("prompt=[[str]]", param="prompt", prompt=[["a"]]),
    cmpl("prompt=[[1,str]]", param="prompt", prompt=[[1, "a"]]),
    cmpl("prompt=[str,int]", param="prompt", prompt=["a", 5]),
    cmpl("prompt={}", param="prompt", prompt={}),
    cmpl("prompt=true", param="prompt", prompt=True),
    cmpl("prompt=5", param="prompt", prompt=5),
    cmpl("prompt=null", param="prompt", prompt=None),
    cmpl("prompt=missing", param="prompt", prompt=DROP),
    cmpl("prompt=[true]", param="prompt", prompt=[True]),
    cmpl("prompt=[1.5]", param="prompt", prompt=[1.5]),
    cmpl("prompt=empty-str", param="prompt", prompt=""),
    cmpl("prompt=[]", param="prompt", prompt=[]),
    cmpl("prompt=[empty-str]", param="prompt", prompt=[""]),
    cmpl("prompt=[[]]", param="prompt", prompt=[[]]),
    cmpl("prompt=lone-surrogate", param="prompt", prompt="a\ud800b"),
    cmpl("prompt=1MB-text", param="prompt", prompt="hello world " * 90_000),
    # --- messages -------------------------------------------------------------------------
    chat("messages=20000", param="messages", messages=[USER] * 20_000),
    chat("content=20000-parts", param="messages",
         messages=[{"role": "user", "content": [{"type": "text", "text": "a"}] * 20_000}]),
    chat("messages=[]", param="messages", messages=[]),
    chat("messages=null", param="messages", messages=None),
    chat("messages=missing", param="messages", messages=DROP),
    chat("messages=str", param="messages", messages="hi"),
    chat("messages=object", param="messages", messages=USER),
    chat("messages=[5]", param="messages.0", messages=[5]),
    chat("messages=[null]", param="messages.0", messages=[None]),
    chat("messages=[[msg]]", param="messages.0", messages=[[USER]]),
    chat("role=5", param="messages.0.role", messages=[{"role": 5, "content": "hi"}]),
    chat("role=null", param="messages.0.role", messages=[{"role": None, "content": "hi"}]),
    chat("role=missing", param="messages.0.role", messages=[{"content": "hi"}]),
    chat("content=5", param="messages.0.content", messages=[{"role": "user", "content": 5}]),
    chat("content=object", param="messages.0.content",
         messages=[{"role": "user", "content": {"text": "hi"}}]),
    chat("content=[text=5]", param="messages.0.content",
         messages=[{"role": "user", "content": [{"type": "text", "text": 5}]}]),
    chat("content=[text-missing]", param="messages.0.content",
         messages=[{"role": "user", "content": [{"type": "text"}]}]),
    chat("content=[[part]]", param="messages.0.content",
         messages=[{"role": "user", "content": [[{"type": "text", "text": "a"}]]}]),
    chat("content=lone-surrogate", param="messages",
         messages=[{"role": "user", "content": "a\udfffb"}]),
    chat("name=5", param="messages.0.name",
         messages=[{"role": "user", "content": "hi", "name": 5}]),
    chat("logprobs=5", param="logprobs", logprobs=5),
    chat("response_format=str", param="response_format", response_format="json"),
    # --- other fields: nested lists, wrong types, null ------------------------------------
    *both("stop=[[str]]", "stop", stop=[["a"]]),
    *both("stop=5", "stop", stop=5),
    cmpl("stop={}", param="stop", stop={}),
    *both("stop_token_ids=[[1]]", "stop_token_ids", stop_token_ids=[[1]]),
    cmpl("stop_token_ids=str", param="stop_token_ids", stop_token_ids="1"),
    cmpl("stop_token_ids=[true]", param="stop_token_ids", stop_token_ids=[True]),
    *both("model=5", "model", model=5),
    *both("model=null", "model", model=None),
    cmpl("model=[]", param="model", model=[]),
    *both("model=missing", "model", model=DROP),
    *both("n=str", "n", n="1"),
    cmpl("n=1.5", param="n", n=1.5),
    cmpl("n=true", param="n", n=True),
    *both("n=null", "n", n=None),
    cmpl("max_tokens=str", param="max_tokens", max_tokens="1"),
    cmpl("max_tokens=1.0", param="max_tokens", max_tokens=1.0),
    cmpl("max_tokens=true", param="max_tokens", max_tokens=True),
    *both("temperature=str", "temperature", temperature="0.5"),
    cmpl("temperature=true", param="temperature", temperature=True),
    *both("stream=str", "stream", stream="yes"),
    cmpl("stream=1", param="stream", stream=1),
    cmpl("stream_options=str", param="stream_options", stream=True, stream_options="x"),
    chat("stream_options.include_usage=str", param="stream_options.include_usage",
         stream=True, stream_options={"include_usage": "yes"}),
    cmpl("logprobs=true", param="logprobs", logprobs=True),
    *both("ignore_eos=null", "ignore_eos", ignore_eos=None),
    cmpl("min_tokens=null", param="min_tokens", min_tokens=None),
    cmpl("skip_special_tokens=str", param="skip_special_tokens", skip_special_tokens="no"),
    *both("seed=str", "seed", seed="1"),
    cmpl("top_k=1.5", param="top_k", top_k=1.5),
    cmpl("logit_bias=str", param="logit_bias", logit_bias="x"),
    cmpl("user=5", param="user", user=5),
    # --- streaming: the same hostile values must be refused before the stream starts ------
    *both("stream-top_k=2**63", "top_k", stream=True, top_k=2**63),
    *both("stream-n=2**63", "n", stream=True, n=2**63),
    *both("stream-stop_token_ids=[2**63]", "stop_token_ids", stream=True, stop_token_ids=[2**63]),
    *both("stream-stop_token_ids=[vocab]", "stop_token_ids", stream=True,
          stop_token_ids=[VOCAB_SIZE]),
    cmpl("stream-prompt=[vocab]", param="prompt", stream=True, prompt=[VOCAB_SIZE]),
    *both("stream-seed=2**64", "seed", stream=True, seed=2**64),
    *both("stream-temperature=NaN", "temperature", stream=True, temperature=NAN),
    *both("stream-min_tokens=2**63", "min_tokens", stream=True, min_tokens=2**63),
    *both("stream-stop=20000-strings", "stop", stream=True,
          stop=[f"s{i}" for i in range(20_000)]),
    cmpl("stream-n=128x3-prompts", param=("n", "prompt"), stream=True, n=128,
         prompt=["a", "b", "c"]),
    chat("stream-content=5", param="messages.0.content", stream=True,
         messages=[{"role": "user", "content": 5}]),
    chat("stream-messages=20000", param="messages", stream=True, messages=[USER] * 20_000),
    # --- unknown models --------------------------------------------------------------------
    *both("model=unknown", "model", status=404, model="gpt-4"),
    *both("stream-model=unknown", "model", status=404, stream=True, model="gpt-4"),
    cmpl("model=case", status=404, param="model", model=MODEL_NAME.upper()),
    cmpl("model=100k-chars", status=404, param="model", model="m" * 100_000),
    # --- bodies that are not JSON objects ---------------------------------------------------
    *raw_both("body=not-json", b"hello"),
    *raw_both("body=empty", b""),
    *raw_both("body=truncated", b'{"model": "tiny", "prompt": '),
    *raw_both("body=trailing-garbage", b'{"model": "tiny", "prompt": "hi", "max_tokens": 1} x'),
    *raw_both("body=two-objects", b'{"model": "tiny"}{"prompt": "hi"}'),
    *raw_both("body=raw-newline-in-string",
              b'{"model": "tiny", "prompt": "a\nb", "max_tokens": 1}'),
    *raw_both("top-level=array", b'[{"model": "tiny", "prompt": "hi", "max_tokens": 1}]'),
    *raw_both("top-level=number", b"5"),
    *raw_both("top-level=string", b'"hi"'),
    *raw_both("top-level=null", b"null"),
    *raw_both("top-level=true", b"true"),
    # --- invalid UTF-8 -----------------------------------------------------------------------
    *raw_both("utf8=invalid-bytes", b"\xff\xfe\xfd"),
    *raw_both("utf8=invalid-in-string", b'{"model": "tiny", "prompt": "\xff", "max_tokens": 1}'),
    Case("cmpl-utf8=invalid-in-key", COMPLETIONS,
         raw=b'{"model": "tiny", "prompt": "hi", "max_tokens": 1, "\xc0\xaf": 1}'),
    Case("cmpl-utf8=overlong", COMPLETIONS,
         raw=b'{"model": "tiny", "prompt": "\xc0\xaf", "max_tokens": 1}'),
    Case("cmpl-utf8=utf16-with-bom", COMPLETIONS,
         raw='{"model": "tiny", "prompt": "hi", "max_tokens": 1}'.encode("utf-16")),
    # --- deeply nested JSON ------------------------------------------------------------------
    *raw_both("nesting=100000-arrays", b"[" * DEEP + b"]" * DEEP),
    Case("cmpl-nesting=prompt-100000", COMPLETIONS,
         raw=b'{"model": "tiny", "max_tokens": 1, "prompt": ' + b"[" * DEEP + b"]" * DEEP + b"}"),
    Case("chat-nesting=content-100000", CHAT,
         raw=b'{"model": "tiny", "max_tokens": 1, "messages": [{"role": "user", "content": '
         + b"[" * DEEP + b"]" * DEEP + b"}]}"),
    *raw_both("nesting=unknown-field-objects",
              b'{"model": "tiny", "prompt": "hi", "max_tokens": 1, "x": '
              + b'{"a": ' * DEEP + b"1" + b"}" * DEEP + b"}"),
    Case("cmpl-nesting=unclosed-1MB", COMPLETIONS, raw=b"[" * 2**20),
    # --- duplicate keys -----------------------------------------------------------------------
    Case("cmpl-duplicate=model", COMPLETIONS,
         raw=b'{"model": "tiny", "model": "tiny", "prompt": "hi", "max_tokens": 1}'),
    Case("cmpl-duplicate=max_tokens", COMPLETIONS,
         raw=b'{"model": "tiny", "prompt": "hi", "max_tokens": 1, "max_tokens": 100000}'),
    Case("chat-duplicate=messages", CHAT,
         raw=b'{"model": "tiny", "max_tokens": 1, "messages": [], '
         b'"messages": [{"role": "user", "content": "hi"}]}'),
    Case("chat-duplicate=stream", CHAT,
         raw=b'{"model": "tiny", "max_tokens": 1, "stream": false, "stream": true, '
         b'"messages": [{"role": "user", "content": "hi"}]}'),
    # --- Content-Type that is not JSON: 415 ---------------------------------------------------
    *[Case(f"{name}-content-type=text/plain", path, raw=encode(BASE[path]),
           headers={"content-type": "text/plain"}, status=415)
      for name, path in ENDPOINTS.items()],
    *[Case(f"{name}-content-type=form-urlencoded", path, raw=b"model=tiny&prompt=hi",
           headers={"content-type": "application/x-www-form-urlencoded"}, status=415)
      for name, path in ENDPOINTS.items()],
    *[Case(f"{name}-content-type=multipart", path, raw=multipart(),
           headers={"content-type": "multipart/form-data; boundary=xyzzy"}, status=415)
      for name, path in ENDPOINTS.items()],
    Case("cmpl-content-type=multipart-no-boundary", COMPLETIONS, raw=multipart(),
         headers={"content-type": "multipart/form-data"}, status=415),
    Case("cmpl-content-type=xml", COMPLETIONS, raw=b"<model>tiny</model>",
         headers={"content-type": "application/xml"}, status=415),
    # --- bodies above --max-request-bytes: 413 -----------------------------------------------
    *[Case(f"{name}-size=16MiB+", path, raw=oversized(path), status=413, code_required=True,
           transport="sized")
      for name, path in ENDPOINTS.items()],
    *[Case(f"{name}-size=16MiB+chunked", path, raw=oversized(path), status=413,
           code_required=True, transport="chunked")
      for name, path in ENDPOINTS.items()],
    Case("cmpl-size=declared-17MiB-never-sent", COMPLETIONS, status=413, code_required=True,
         transport="declared", declared_length=17 * 2**20),
    # --- the API key, checked before the body is read: 401 -----------------------------------
    *[Case(f"{name}-auth=missing", path, body=BASE[path], headers={"authorization": None},
           status=401)
      for name, path in ENDPOINTS.items()],
    *[Case(f"{name}-auth=wrong-key", path, body=BASE[path],
           headers={"authorization": "Bearer nope"}, status=401)
      for name, path in ENDPOINTS.items()],
    Case("cmpl-auth=basic-scheme", COMPLETIONS, body=BASE[COMPLETIONS],
         headers={"authorization": f"Basic {API_KEY}"}, status=401),
    Case("cmpl-auth=bearer-without-key", COMPLETIONS, body=BASE[COMPLETIONS],
         headers={"authorization": "Bearer"}, status=401),
    *[Case(f"{name}-auth=missing+invalid-json", path, raw=b"{not json",
           headers={"authorization": None}, status=401)
      for name, path in ENDPOINTS.items()],
    *[Case(f"{name}-auth=missing+body-never-sent", path, raw=b'{"model": "tiny", "prompt"',
           headers={"authorization": None}, status=401, transport="declared",
           declared_length=1000)
      for name, path in ENDPOINTS.items()],
]
# fmt: on


# --- talking to the server --------------------------------------------------------------------


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def describe(self) -> str:
        return f"{self.status} {self.body[:600]!r}"


def request_headers(case: Case) -> dict[str, str]:
    headers = {"content-type": "application/json", "authorization": AUTH["Authorization"]}
    for name, value in case.headers.items():
        if value is None:
            headers.pop(name, None)
        else:
            headers[name] = value
    return headers


def send(server: ServerProcess, client: httpx.Client, case: Case) -> Answer:
    if case.transport == "httpx":
        response = client.post(
            server.url + case.path,
            content=case.payload(),
            headers=request_headers(case),
            timeout=TIMEOUT_S,
        )
        return Answer(response.status_code, dict(response.headers), response.content)
    return send_raw(server, case)


def send_raw(server: ServerProcess, case: Case) -> Answer:
    """One HTTP/1.1 exchange over a plain socket: the body (if any) is written by a thread
    while this one reads, so that an answer sent before the body was read is still seen."""
    headers = request_headers(case)
    timeout = TIMEOUT_S
    if case.transport == "sized":
        payload = case.payload()
        headers["content-length"] = str(len(payload))
        chunks: Iterable[bytes] = (payload[i : i + 2**20] for i in range(0, len(payload), 2**20))
    elif case.transport == "chunked":
        headers["transfer-encoding"] = "chunked"
        chunks = _chunked(case.payload())
    elif case.transport == "declared":
        headers["content-length"] = str(case.declared_length)
        chunks = [case.raw] if case.raw else []
        timeout = EARLY_ANSWER_TIMEOUT_S
    else:
        raise AssertionError(case.transport)
    head = f"POST {case.path} HTTP/1.1\r\nhost: 127.0.0.1:{server.port}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "connection: close\r\n\r\n"
    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout) as sock:
        sock.sendall(head.encode())

        def write() -> None:
            try:
                for chunk in chunks:
                    sock.sendall(chunk)
            except OSError:  # the server answered and closed: what it said is read below
                pass

        writer = threading.Thread(target=write, daemon=True)
        writer.start()
        try:
            return _read_response(sock, timeout)
        finally:
            writer.join(timeout=5)


def _chunked(data: bytes, size: int = 2**20) -> Iterator[bytes]:
    for start in range(0, len(data), size):
        piece = data[start : start + size]
        yield f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
    yield b"0\r\n\r\n"


def _read_response(sock: socket.socket, timeout: float) -> Answer:
    buffer = b""

    def more() -> bool:
        nonlocal buffer
        try:
            data = sock.recv(65536)
        except TimeoutError as error:
            raise AssertionError(f"no complete answer within {timeout} s: {buffer!r}") from error
        except ConnectionResetError:
            return False
        buffer += data
        return bool(data)

    while b"\r\n\r\n" not in buffer:
        if not more():
            raise AssertionError(f"connection closed before an answer: {buffer!r}")
    head, _, rest = buffer.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    status = int(status_line.split()[1])
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    buffer = rest
    if "content-length" in headers:
        length = int(headers["content-length"])
        while len(buffer) < length and more():
            pass
        return Answer(status, headers, buffer[:length])
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while not buffer.endswith(b"0\r\n\r\n") and more():
            pass
        body, data = b"", buffer
        while data:
            size_line, _, data = data.partition(b"\r\n")
            size = int(size_line.split(b";")[0] or b"0", 16)
            if size == 0:
                break
            body, data = body + data[:size], data[size + 2 :]
        return Answer(status, headers, body)
    while more():
        pass
    return Answer(status, headers, buffer)


# --- checks ---------------------------------------------------------------------------------


def _names(param: Any, expected: str | tuple[str, ...]) -> bool:
    options = (expected,) if isinstance(expected, str) else expected
    return isinstance(param, str) and any(
        param == option or param.startswith(option + ".") for option in options
    )


def error_body_problems(error: Any, where: str) -> list[str]:
    """What is wrong with one OpenAI error object (``{"message", "type", "param", "code"}``)."""
    if not isinstance(error, dict):
        return [f"{where}: error is not an object: {error!r}"]
    problems = []
    if not isinstance(error.get("message"), str) or not error["message"]:
        problems.append(f"{where}: error.message is not a non-empty string: {error!r}")
    if not isinstance(error.get("type"), str):
        problems.append(f"{where}: error.type is not a string: {error!r}")
    for key in ("param", "code"):
        if key not in error or not (error[key] is None or isinstance(error[key], str)):
            problems.append(f"{where}: error.{key} is not a string or null: {error!r}")
    return problems


def stream_error_problems(body: bytes) -> list[str]:
    """Error events (``data: {"error": ...}``) inside a server-sent event stream."""
    problems = []
    for line in body.decode("utf-8", "replace").splitlines():
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        try:
            event = json.loads(line[len("data: ") :])
        except ValueError:
            problems.append(f"stream event is not JSON: {line[:200]!r}")
            continue
        if isinstance(event, dict) and "error" in event:
            problems.append(f"stream error event: {line[:300]}")
            problems += error_body_problems(event["error"], "stream error event")
    return problems


def answer_problems(case: Case, answer: Answer) -> list[str]:
    problems = []
    if answer.status != case.status:
        problems.append(f"status {answer.status}, expected {case.status}")
    if answer.headers.get("content-type", "").startswith("text/event-stream"):
        problems.append("answered with a stream")
        return problems + stream_error_problems(answer.body)
    try:
        body = json.loads(answer.body)
    except ValueError:
        return [*problems, f"body is not JSON: {answer.body[:300]!r}"]
    if not isinstance(body, dict) or "error" not in body:
        return [*problems, "body is not OpenAI's error shape {'error': {...}}"]
    error = body["error"]
    problems += error_body_problems(error, "body")
    if not isinstance(error, dict):
        return problems
    if case.status == 400 and error.get("type") != "invalid_request_error":
        problems.append(f"error.type {error.get('type')!r}, expected 'invalid_request_error'")
    if case.param is not None and not _names(error.get("param"), case.param):
        problems.append(f"error.param {error.get('param')!r}, expected {case.param!r}")
    if case.code_required and not isinstance(error.get("code"), str):
        problems.append(f"error.code {error.get('code')!r}, expected a string")
    return problems


def serving_problems(server: ServerProcess, client: httpx.Client) -> list[str]:
    """Is the server alive and still serving: /health 200 and a 1-token completion?"""
    if server.process.poll() is not None:
        return [f"server exited with status {server.process.returncode}"]
    try:
        health = client.get(f"{server.url}/health", timeout=TIMEOUT_S)
        if health.status_code != 200:
            return [f"/health {health.status_code}: {health.text[:300]}"]
        reply = client.post(
            server.url + COMPLETIONS,
            json={"model": MODEL_NAME, "prompt": "hi", "max_tokens": 1},
            headers=AUTH,
            timeout=TIMEOUT_S,
        )
    except httpx.HTTPError as error:
        return [f"server not answering afterwards: {type(error).__name__}: {error}"]
    if reply.status_code != 200 or len(reply.json().get("choices", [])) != 1:
        return [f"a 1-token completion afterwards got {reply.status_code}: {reply.text[:300]}"]
    return []


#: What the server's log says when a request raised where it should not have.
INTERNAL_ERROR_MARKS = ("internal error", "Exception in ASGI application", "Traceback")


class Target:
    """The module's server; a case that leaves it dead fails, and the next case gets a new one
    (with the contract met, it is started once). Hostile requests and the checks after them
    go through separate keep-alive clients (a new ``httpx`` client per request costs more
    than the request), so a check never reuses a connection that carried a hostile request."""

    def __init__(self, factory, checkpoint) -> None:
        self.factory = factory
        self.checkpoint = checkpoint
        self.server: ServerProcess = factory(checkpoint, *SERVER_ARGS)
        self.broken = False
        self.restarts = 0
        self.hostile = httpx.Client(timeout=TIMEOUT_S)
        self.probe = httpx.Client(timeout=TIMEOUT_S)

    def close(self) -> None:
        self.hostile.close()
        self.probe.close()

    def get(self) -> ServerProcess:
        if self.broken:
            self.server.stop(timeout=10)
            self.server = self.factory(self.checkpoint, *SERVER_ARGS)
            self.broken = False
            self.restarts += 1
        return self.server


@pytest.fixture(scope="module")
def target(start_module_server, chat_checkpoint) -> Iterator[Target]:
    target = Target(start_module_server, chat_checkpoint)
    yield target
    target.close()


def test_the_table_is_big_and_ids_are_unique():
    ids = [case.id for case in CASES]
    assert len(ids) == len(set(ids)), sorted({i for i in ids if ids.count(i) > 1})
    assert len(CASES) >= 100


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_hostile_request_is_refused_and_the_server_keeps_serving(target, case):
    server = target.get()
    log_start = len(server.log())
    problems: list[str] = []
    answer: Answer | None = None
    try:
        answer = send(server, target.hostile, case)
    except (httpx.HTTPError, OSError, AssertionError) as error:
        problems.append(f"no answer: {type(error).__name__}: {error}")
    if answer is not None:
        problems += answer_problems(case, answer)
    after = serving_problems(server, target.probe)
    if after:
        target.broken = True
        problems += ["afterwards: " + p for p in after]
    log = server.log()[log_start:]
    internal_error = any(mark in log for mark in INTERNAL_ERROR_MARKS)
    if internal_error:
        problems.append("the server logged an internal error")
    details = [f"answer: {answer.describe() if answer is not None else '(none)'}"]
    if internal_error:
        details.append(f"server log:\n{log[-3000:]}")
    assert not problems, "\n".join(problems + details)
