"""Which grammar library: xgrammar against llguidance, on one CPU core (issue 19).

``pip install llguidance`` first (not a dependency), then
``python -P benchmarks/grammar_backends.py``.
For the 20 bounded schemas (structured_schemas.py) on llama3-8b's vocabulary size (the
byte-level tokenizer of bytelevel_tokenizer.py): the tokenizer set-up, each schema's compile
time, and the time of every token mask while walking one valid instance of each schema.
"""

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import llguidance
import llguidance.hf
import llguidance.torch
import xgrammar as xgr
from bytelevel_tokenizer import write_byte_level_tokenizer
from structured_schemas import SCHEMAS
from transformers import AutoTokenizer

from metroline.engine.structured_outputs import StructuredOutputsParams, build_grammar

V = 128256
_folder = Path(tempfile.mkdtemp())
tok = AutoTokenizer.from_pretrained(str(write_byte_level_tokenizer(_folder, V, 128000, 128001)))
INSTANCES = [
    {"name": "abcdefg"},
    {"age": 42},
    {"ok": True},
    {"color": "green"},
    {"name": "ab", "age": 7, "ok": False},
    {"tags": ["a", "bcd"]},
    {"scores": [1, 22, 100]},
    {"user": {"name": "zo", "age": 9}},
    {"a": {"b": {"c": True}}},
    {"level": -3},
    {"code": "xyz"},
    {"flags": [True, False]},
    {"name": "x", "nick": "y"},
    {"kind": "point", "x": 1, "y": 2},
    {"items": [{"id": 5}]},
    {"status": "on"},
    {"maybe": None},
    {"pair": ["ab", 3]},
    {"empty": {}},
    {"id": 12, "owner": {"name": "q", "admin": True}, "labels": ["x"]},
]
t = time.perf_counter()
info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=V)
xi = time.perf_counter() - t
comp = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
t = time.perf_counter()
lt = llguidance.hf.from_tokenizer(tok, n_vocab=V)
li = time.perf_counter() - t
res = {"xgrammar": {"compile": [], "mask": []}, "llguidance": {"compile": [], "mask": []}}
for schema, inst in zip(SCHEMAS, INSTANCES):
    text = json.dumps(inst)
    ids = tok.encode(text, add_special_tokens=False)
    t = time.perf_counter()
    cg = comp.compile_grammar(build_grammar(StructuredOutputsParams(json=schema)))
    res["xgrammar"]["compile"].append(time.perf_counter() - t)
    m = xgr.GrammarMatcher(cg)
    bm = xgr.allocate_token_bitmask(1, V)
    for i in ids:
        t = time.perf_counter()
        m.fill_next_token_bitmask(bm, 0)
        res["xgrammar"]["mask"].append(time.perf_counter() - t)
        assert m.accept_token(i), (text, tok.decode([i]))
    t = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(
        schema, defaults={"whitespace_flexible": True}
    )
    lm = llguidance.LLMatcher(lt, grammar)
    res["llguidance"]["compile"].append(time.perf_counter() - t)
    assert not lm.is_error(), lm.get_error()
    lbm = llguidance.torch.allocate_token_bitmask(1, V)
    for i in ids:
        t = time.perf_counter()
        llguidance.torch.fill_next_token_bitmask(lm, lbm, 0)
        res["llguidance"]["mask"].append(time.perf_counter() - t)
        assert lm.consume_token(i), (text, tok.decode([i]), lm.get_error())
print(f"tokenizer setup: xgrammar {xi:.2f} s, llguidance {li:.2f} s")
for name, r in res.items():
    c, m = sorted(r["compile"]), sorted(r["mask"])
    p99 = m[int(len(m) * 0.99)]
    print(
        f"{name}: compile median {statistics.median(c) * 1e3:.2f} ms, max {c[-1] * 1e3:.1f} ms; "
        f"mask median {statistics.median(m) * 1e3:.3f} ms, p99 {p99 * 1e3:.3f} ms, "
        f"max {m[-1] * 1e3:.2f} ms over {len(m)} tokens"
    )
