"""Request bodies parsed as strict JSON: UTF-8 only (RFC 8259; Python's parser would also
take UTF-16 and UTF-32), and no key twice in one object (which value counts would depend on
the parser: a proxy that checks the first ``model`` and a server that uses the last must
never disagree). A violation is answered like malformed JSON, a 400 saying what is wrong.

Parsing runs on the event loop and holds the GIL (a thread would not help), and its cost
grows with the number of values, above all arrays and objects. So a large body is first
scanned for its shape (strings stripped by one regular expression, then brackets and commas
counted, all in C): one holding more values or containers than any request this server can
accept (:class:`JSONBudget`) is refused before it is parsed. The parser runs with the
cyclic garbage collector paused: the objects it builds hold no cycles, and collections
during a parse of millions of lists cost more than the parse.
"""

from __future__ import annotations

import gc
import json
import re
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute

from ..sampling_params import shorten
from .errors import bad_request

#: JSON strings (escapes included); replaced by ``""`` before counting brackets and commas.
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
#: Room for every bounded field besides the prompts: messages and their content parts,
#: stop lists, small objects.
_OTHER_VALUES = 2**19
_OTHER_CONTAINERS = 2**18


@dataclass(frozen=True, slots=True)
class JSONBudget:
    """The most values (commas) and arrays plus objects a request body accepted by this
    server can hold: prompts bring at most ``max_sequences * max_model_len`` token ids in at
    most ``max_sequences`` lists, everything else less than the fixed allowance."""

    values: int
    containers: int

    @classmethod
    def for_server(cls, max_sequences: int, max_model_len: int) -> JSONBudget:
        return cls(
            values=max_sequences * max_model_len + _OTHER_VALUES,
            containers=max_sequences + _OTHER_CONTAINERS,
        )

    def check(self, body: bytes) -> None:
        """400 when ``body`` holds more than the budget (only scanned when it could)."""
        if len(body) <= min(self.values, 2 * self.containers):
            return
        shape = _STRING.sub(b'""', body)
        containers = shape.count(b"[") + shape.count(b"{")
        if containers > self.containers:
            raise bad_request(
                f"the request body holds {containers} JSON arrays and objects; no request this "
                f"server accepts needs more than {self.containers}",
                code="request_too_complex",
            )
        values = shape.count(b",")
        if values > self.values:
            raise bad_request(
                f"the request body holds about {values} JSON values; no request this server "
                f"accepts needs more than {self.values} (--max-sequences-per-request times "
                "max_model_len, plus the other fields)",
                code="request_too_complex",
            )


def _object_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"the key {shorten(key, 40)!r} appears twice in one object")
        result[key] = value
    return result


def parse_strict_json(body: bytes, budget: JSONBudget | None = None) -> Any:
    """``body`` as JSON; raises :class:`json.JSONDecodeError` for anything but UTF-8 JSON
    without repeated keys, and a 400 for a body over ``budget``."""
    if budget is not None:
        budget.check(body)
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as error:
        raise json.JSONDecodeError(
            f"the body must be UTF-8 ({error.reason} at byte {error.start})", "", 0
        ) from None
    collecting = gc.isenabled()
    gc.disable()
    try:
        return json.loads(text, object_pairs_hook=_object_without_duplicates)
    except RecursionError:
        raise json.JSONDecodeError("the body is nested too deeply", "", 0) from None
    except ValueError as error:
        if isinstance(error, json.JSONDecodeError):
            raise
        raise json.JSONDecodeError(str(error), "", 0) from None
    finally:
        if collecting:
            gc.enable()


class StrictJSONRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            budget = self.app.state.server.json_budget
            self._json = parse_strict_json(await self.body(), budget)
        return self._json


class StrictJSONRoute(APIRoute):
    """A route whose JSON body is parsed by :func:`parse_strict_json`."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict_handler(request: Request) -> Response:
            return await handler(StrictJSONRequest(request.scope, request.receive))

        return strict_handler
