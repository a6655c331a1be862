"""The hostile request bodies of ``test_hostile_requests.py``: ~250 hand-written cases.

Each :class:`Case` is one request (a JSON body, or raw bytes sent as they are, plus header
changes and how it is sent) and what the server must answer: the status (400 unless said
otherwise) and, where the contract names one, the ``param`` of OpenAI's error object. Case ids
are ``cmpl-...`` or ``chat-...`` by endpoint and must stay unique (a test checks). The limits
the cases probe are the contract's defaults, listed in the test module's docstring.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from .conftest import API_KEY, MODEL_NAME

#: The tiny checkpoint's vocabulary (tests/conftest.py VOCAB_SIZE): ids >= this are outside it.
VOCAB_SIZE = 512
#: The contract's defaults for --max-request-bytes and --max-sequences-per-request.
MAX_REQUEST_BYTES = 16 * 2**20
MAX_SEQUENCES = 256

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
