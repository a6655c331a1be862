"""A minimal streaming HTTP/1.1 client (standard library only) for load generation.

It posts JSON and yields the arrival time of every server-sent event, so a benchmark can
measure time to first token and inter-token latency without third-party packages (the GPU
machines have none beyond torch's stack).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class StreamResult:
    sent_at: float
    event_times: list[float] = field(default_factory=list)
    num_tokens: int = 0
    error: str | None = None
    #: The server's id for the request (``id`` of its events), to match its request log.
    response_id: str | None = None


async def _read_chunked(reader: asyncio.StreamReader):
    while True:
        size_line = await reader.readline()
        size = int(size_line.split(b";")[0].strip() or b"0", 16)
        if size == 0:
            await reader.readline()
            return
        data = await reader.readexactly(size)
        await reader.readexactly(2)
        yield data


async def stream_completion(host: str, port: int, body: dict[str, Any]) -> StreamResult:
    """POST /v1/completions with ``stream: true``; record when each token-bearing event came."""
    result = StreamResult(sent_at=time.perf_counter())
    try:
        reader, writer = await asyncio.open_connection(host, port)
        payload = json.dumps(body).encode()
        writer.write(
            b"POST /v1/completions HTTP/1.1\r\nHost: " + host.encode() + b"\r\n"
            b"Content-Type: application/json\r\nConnection: close\r\n"
            b"Content-Length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload
        )
        await writer.drain()
        status = await reader.readline()
        if b" 200 " not in status:
            result.error = status.decode(errors="replace").strip()
            writer.close()
            return result
        chunked = False
        while (line := await reader.readline()) not in (b"\r\n", b""):
            if line.lower().startswith(b"transfer-encoding:") and b"chunked" in line.lower():
                chunked = True
        buffer = b""
        chunks = _read_chunked(reader) if chunked else _read_plain(reader)
        async for data in chunks:
            buffer += data
            while b"\n\n" in buffer:
                event, buffer = buffer.split(b"\n\n", 1)
                if not event.startswith(b"data: ") or event == b"data: [DONE]":
                    continue
                message = json.loads(event[6:])
                result.response_id = result.response_id or message.get("id")
                tokens = sum(len(c.get("token_ids") or []) or 1 for c in message.get("choices", []))
                if message.get("choices"):
                    result.event_times.append(time.perf_counter())
                    result.num_tokens += tokens
        writer.close()
    except (OSError, asyncio.IncompleteReadError, ValueError) as error:
        result.error = repr(error)
    return result


async def _read_plain(reader: asyncio.StreamReader):
    while data := await reader.read(65536):
        yield data


async def get_status(host: str, port: int, path: str) -> int:
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError:
        return 0
    writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    status = await reader.readline()
    writer.close()
    try:
        return int(status.split()[1])
    except (IndexError, ValueError):
        return 0
