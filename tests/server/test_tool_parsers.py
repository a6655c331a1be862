"""The tool-call parsers on text: each format with one and several calls, content around
them, malformed output (no calls, the whole text as content), the bounds, and streaming:
the deltas of any split of the text add up to what the whole text parses to."""

from __future__ import annotations

import json
import random
import re

import pytest

from metroline.engine.server.tool_parsers import TOOL_PARSERS, CallArrayParser, tool_parser
from metroline.engine.server.tool_parsers.base import (
    MAX_HELD_CHARS,
    MAX_TOOL_CALLS,
    ParsedOutput,
    collect,
)

HERMES, LLAMA, MISTRAL = (TOOL_PARSERS[n] for n in ("hermes", "llama3_json", "mistral"))
WEATHER = '{"city": "Paris", "days": [1, 2], "note": "a \\"quoted\\" } brace ü"}'

# fmt: off
#: (parser, text, content, [(name, arguments)]) for well-formed outputs.
WELL_FORMED = [
    (HERMES, f'<tool_call>\n{{"name": "get_weather", "arguments": {WEATHER}}}\n</tool_call>',
     None, [("get_weather", WEATHER)]),
    (HERMES, 'Let me look.\n\n<tool_call>\n{"name": "a", "arguments": {}}\n</tool_call>\n'
     '<tool_call>\n{"arguments": {"x": 1}, "name": "b", "extra": [1, {"y": "]"}]}\n</tool_call>',
     "Let me look.", [("a", "{}"), ("b", '{"x": 1}')]),
    (HERMES, '<think>hmm</think>\n<tool_call>{"name": "a", "arguments": {"k": null}}',
     "<think>hmm</think>", [("a", '{"k": null}')]),
    (HERMES, '<tool_call>{"name": "a", "arguments": {}}</tool_call>\nDone.',
     "\nDone.", [("a", "{}")]),
    (LLAMA, f'{{"name": "get_weather", "parameters": {WEATHER}}}',
     None, [("get_weather", WEATHER)]),
    (LLAMA, '<|python_tag|>{"name": "a", "parameters": {"q": "x"}}; {"name": "b", "arguments": {}}',
     None, [("a", '{"q": "x"}'), ("b", "{}")]),
    (LLAMA, ' \n{"name": "a", "parameters": {}}\n{"name": "b", "parameters": {}}',
     None, [("a", "{}"), ("b", "{}")]),
    (LLAMA, 'Sure. <|python_tag|>{"name": "a", "parameters": {}}', "Sure.", [("a", "{}")]),
    (MISTRAL, f'[TOOL_CALLS] [{{"name": "get_weather", "arguments": {WEATHER}}}, '
     '{"name": "b", "arguments": {}}]', None, [("get_weather", WEATHER), ("b", "{}")]),
    (MISTRAL, 'On it. [TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]b[ARGS] {}',
     "On it.", [("get_weather", '{"city": "Paris"}'), ("b", "{}")]),
    (CallArrayParser(), f' [{{"name": "get_weather", "parameters": {WEATHER}}}] ',
     None, [("get_weather", WEATHER)]),
]

#: Outputs that do not match their parser's format before anything of a call could be
#: sent: no calls, the whole text as content, streamed or not.
MALFORMED = [
    (HERMES, '<tool_call>\n{"name": "a"}\n</tool_call>'),  # no arguments
    (HERMES, '<tool_call>\n{"name": "a", "arguments": [1]}\n</tool_call>'),  # not an object
    (HERMES, "<tool_call>\nnot json\n</tool_call>"),
    (HERMES, '<tool_call>{"name": "a", "name": "b", "arguments": {}}</tool_call>'),
    (HERMES, '<tool_call>{"name": "", "arguments": {}}</tool_call>'),
    (LLAMA, '{"answer": 42}'),
    (LLAMA, '{"answer": {"name": "a", "parameters": {}}}'),
    (LLAMA, '<|python_tag|>print("hi")'),
    (MISTRAL, "[TOOL_CALLS]not a name[ARGS]{}"),
    (MISTRAL, "[TOOL_CALLS] []"),
    (CallArrayParser(), 'Sure: [{"name": "a", "parameters": {}}]'),
]
#: Outputs that break after a call was sent: parsed whole, no calls and the text as content;
#: streamed, the deltas sent stand and the text not sent yet is content.
BROKEN_LATE = [
    (HERMES, '<tool_call>\n{"name": "a", "arguments": {"x": 1}\n</tool_call>'),  # unclosed
    (HERMES, '<tool_call>{"name": "a", "arguments": {"x": 01}}</tool_call>'),  # bad JSON
    (HERMES, '<tool_call>{"name": "a", "arguments": {"x": 1]}</tool_call>'),
    (HERMES, '<tool_call>{"name": "a", "arguments": {}} trailing</tool_call>'),
    (LLAMA, '{"name": "a", "parameters": {}} {"name": '),  # cut off
    (MISTRAL, '[TOOL_CALLS] [{"name": "a", "arguments": {}},]'),
    (CallArrayParser(), '[{"name": "a", "parameters": {"x": '),
]

#: Plain answers: the text as content, unchanged (whitespace included).
PLAIN = ["", "  Hello there!  \n", "no <tool_ call, [TOOL_ or {brace} here <tool_",
         "a <|python_tag partial tag", "[TOOL_CALLS"]
# fmt: on


def calls_of(parsed: ParsedOutput) -> list[tuple[str, str]]:
    return [(call.name, call.arguments) for call in parsed.tool_calls]


def streamed(parser, pieces: list[str]) -> tuple[ParsedOutput, list]:
    extractor = parser.extractor()
    deltas = [extractor.feed(piece) for piece in pieces] + [extractor.finish()]
    return collect(deltas), deltas


def random_split(text: str, rng: random.Random) -> list[str]:
    cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 12))))
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]


@pytest.mark.parametrize(("parser", "text", "content", "calls"), WELL_FORMED)
def test_each_format_gives_its_calls_and_content(parser, text, content, calls):
    parsed = parser.parse(text)
    assert (parsed.content, calls_of(parsed)) == (content, calls)
    for _name, arguments in calls:
        assert isinstance(json.loads(arguments), dict)
    ids = [call.id for call in parsed.tool_calls]
    assert len(set(ids)) == len(ids)
    pattern = r"[a-zA-Z0-9]{9}" if parser is MISTRAL else r"chatcmpl-tool-[0-9a-f]{32}"
    assert all(re.fullmatch(pattern, i) for i in ids), ids


@pytest.mark.parametrize(("parser", "text"), MALFORMED)
def test_malformed_output_is_all_content(parser, text):
    assert parser.parse(text) == ParsedOutput(content=text)
    # Nothing of a call was sent before it broke: the stream agrees, piece by piece.
    result, _ = streamed(parser, list(text))
    assert result == ParsedOutput(content=text)


@pytest.mark.parametrize("text", PLAIN)
@pytest.mark.parametrize("name", sorted(TOOL_PARSERS))
def test_plain_text_is_content_unchanged(name, text):
    parser = TOOL_PARSERS[name]
    assert parser.parse(text) == ParsedOutput(content=text or None)
    assert streamed(parser, list(text))[0] == ParsedOutput(content=text or None)


@pytest.mark.parametrize(("parser", "text"), BROKEN_LATE)
def test_output_broken_after_a_call_was_sent(parser, text):
    assert parser.parse(text) == ParsedOutput(content=text)
    rng = random.Random(text)
    for pieces in [[text], list(text)] + [random_split(text, rng) for _ in range(10)]:
        result, _ = streamed(parser, pieces)
        assert [call.name for call in result.tool_calls] == ["a"]
        assert result.tool_calls[0].arguments in text and (result.content or "") in text


@pytest.mark.parametrize(("parser", "text", "content", "calls"), WELL_FORMED + [
    (p, t, t, []) for p, t in MALFORMED])  # fmt: skip
def test_any_split_of_the_stream_adds_up_to_the_whole(parser, text, content, calls):
    rng = random.Random(text)
    splits = [list(text), [text]] + [random_split(text, rng) for _ in range(20)]
    for pieces in splits:
        result, deltas = streamed(parser, pieces)
        assert (result.content, calls_of(result)) == (content, calls), pieces
        seen: set[int] = set()
        for delta in deltas:
            for piece in delta.tool_calls:  # OpenAI's shape: id and name first, once
                assert (piece.id is not None) == (piece.index not in seen)
                assert (piece.name is not None) == (piece.id is not None)
                seen.add(piece.index)
        assert sorted(seen) == list(range(len(calls)))


def test_every_boundary_of_one_example():
    text = (
        'Voilà:\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich \\u00e9", '
        '"x": [{}]}}\n</tool_call>\n<tool_call>{"name": "b", "arguments": {}}</tool_call>'
    )
    whole = HERMES.parse(text)
    assert calls_of(whole)[0] == ("get_weather", '{"city": "Zürich \\u00e9", "x": [{}]}')
    for one in range(1, len(text)):
        for two in (one + 1, one + 7, len(text)):
            pieces = [text[:one], text[one:two], text[two:]]
            result, _ = streamed(HERMES, pieces)
            assert (result.content, calls_of(result)) == (whole.content, calls_of(whole)), one


def test_arguments_stream_as_they_arrive():
    """The name goes out as soon as the arguments start; then each piece as it comes."""
    extractor = LLAMA.extractor()
    first = extractor.feed('{"name": "search", "parameters": {"q": "lo')
    (call,) = first.tool_calls
    assert (call.index, call.name, call.arguments) == (0, "search", '{"q": "lo')
    assert call.id.startswith("chatcmpl-tool-")
    second = extractor.feed('ng text"}}')
    assert [(c.index, c.id, c.name, c.arguments) for c in second.tool_calls] == [
        (0, None, None, 'ng text"}')  # the object's own "}" is not the arguments'
    ]
    assert extractor.finish().tool_calls == [] and not extractor.failed


def test_a_stream_cannot_take_back_what_it_sent():
    """Cut off inside the arguments: the stream has sent the call's start; the whole
    text, parsed at once, has no calls."""
    text = '<tool_call>\n{"name": "a", "arguments": {"x": "unfinished'
    result, _ = streamed(HERMES, [text[:35], text[35:]])
    assert calls_of(result) == [("a", '{"x": "unfinished')]
    assert HERMES.parse(text) == ParsedOutput(content=text)
    # Broken after a first call: that call stands, the rest is content.
    text = '<tool_call>{"name": "a", "arguments": {}}</tool_call><tool_call>oops'
    result, _ = streamed(HERMES, list(text))
    assert (result.content, calls_of(result)) == ("<tool_call>oops", [("a", "{}")])


def test_at_most_max_tool_calls():
    call = '<tool_call>{"name": "f", "arguments": {}}</tool_call>'
    assert len(HERMES.parse(call * MAX_TOOL_CALLS).tool_calls) == MAX_TOOL_CALLS
    assert HERMES.parse(call * (MAX_TOOL_CALLS + 1)).tool_calls == ()


def test_held_text_is_bounded():
    """A call whose name does not come within MAX_HELD_CHARS characters is content, so a
    stream never holds back more; long content and long arguments keep only a small
    window of text."""
    filler = "x" * MAX_HELD_CHARS
    late_name = f'{{"thought": "{filler}", "name": "a", "parameters": {{}}}}'
    assert LLAMA.parse(late_name) == ParsedOutput(content=late_name)
    extractor = LLAMA.extractor()
    held = 0
    for char in late_name:
        extractor.feed(char)
        held = max(held, len(extractor._reader._buf))
    assert held <= MAX_HELD_CHARS + 16
    for text in ("word " * 5000, '{"name": "a", "parameters": {"t": "' + "y" * 20000 + '"}}'):
        extractor = LLAMA.extractor()
        for start in range(0, len(text), 3):
            extractor.feed(text[start : start + 3])
            assert len(extractor._reader._buf) <= 64
        extractor.finish()
        assert not extractor.failed


def test_deep_or_huge_json_is_malformed():
    deep = '{"name": "a", "parameters": ' + "[" * 200 + "]" * 200 + "}"
    assert LLAMA.parse(deep).tool_calls == ()
    long_name = '{"name": "' + "n" * 300 + '", "parameters": {}}'
    assert LLAMA.parse(long_name).tool_calls == ()


def test_the_registry_has_vllms_names():
    assert sorted(TOOL_PARSERS) == ["hermes", "llama3_json", "mistral"]
    assert tool_parser("hermes") is HERMES
    with pytest.raises(ValueError, match="hermes, mistral"):
        tool_parser("pythonic")
    assert MISTRAL.needs_special_tokens and HERMES.needs_special_tokens
    assert not LLAMA.needs_special_tokens
