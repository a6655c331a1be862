"""The activator's limits and manners over real HTTP (issue 22 review): reservations made
before a body is read, a read deadline, a held client that disconnects, health probes that
wake nothing, ``Connection: close``, end-to-end headers only, and where it binds."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from metroline.operator.activator import end_to_end
from metroline.operator.scaler import listen_host

from .test_activator import HOST, KEY, Directory, post, started, until

pytestmark = pytest.mark.asyncio


async def _open(port: int, head: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head)
    await writer.drain()
    return reader, writer


def _head(length: int) -> bytes:
    return (f"POST /v1/completions HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: {length}\r\n"
            "Content-Type: application/json\r\n\r\n").encode()  # fmt: skip


async def test_bytes_are_reserved_before_the_body_is_read(engine):
    directory = Directory()
    activator = await started(directory, engine[1], max_body=1000, max_held_bytes=1500)
    try:
        _, slow = await _open(activator.port, _head(1000))  # declares 1000, sends nothing yet
        await until(lambda: activator.held == 1 and activator.held_bytes == 1000)
        status, headers, body = await post(activator, b"x" * 600)
        assert status == 503 and json.loads(body)["error"]["code"] == "activator_full"
        assert headers["Connection"] == "close"
        slow.close()
        await until(lambda: activator.held == activator.held_bytes == 0)
    finally:
        await activator.stop()
    assert directory.demands == []


async def test_a_body_that_does_not_arrive_in_time_is_a_408(engine):
    activator = await started(Directory(), engine[1], read_timeout_s=0.2, max_reading=1)
    try:
        reader, writer = await _open(activator.port, _head(10) + b"{")
        await until(lambda: activator.reading == 1)
        status, _, _ = await post(activator, {"prompt": "hi"})  # a second reader: refused
        assert status == 503
        answer = await asyncio.wait_for(reader.read(), 30)
        assert answer.startswith(b"HTTP/1.1 408") and b"Connection: close" in answer
        writer.close()
        assert activator.held == activator.held_bytes == activator.reading == 0
    finally:
        await activator.stop()


async def test_a_held_client_that_disconnects_frees_its_slot_and_is_never_proxied(engine):
    fake, port = engine
    directory = Directory()
    activator = await started(directory, port)
    try:
        payload = b'{"prompt": "hi"}'
        _, writer = await _open(activator.port, _head(len(payload)) + payload)
        await until(lambda: activator.held == 1 and activator.holding(KEY))
        writer.close()
        await until(lambda: activator.held == 0 and not activator.holding(KEY))
        directory.ready = ["127.0.0.1"]
        await asyncio.sleep(0.05)  # polls that would have proxied it
        assert fake.seen == [] and activator.held_bytes == 0
    finally:
        await activator.stop()


@pytest.mark.parametrize("path", ["/health", "/ready", "/metrics", "/version"])
async def test_health_probes_wake_nothing(engine, path):
    directory = Directory()
    activator = await started(directory, engine[1])
    try:
        async with aiohttp.ClientSession() as session, session.get(
            f"http://127.0.0.1:{activator.port}{path}", headers={"Host": HOST}
        ) as resp:  # fmt: skip
            assert resp.status == 503 and "Retry-After" in resp.headers
    finally:
        await activator.stop()
    assert directory.demands == []


async def test_proxied_answers_close_the_connection_and_carry_end_to_end_headers(engine):
    fake, port = engine
    directory = Directory()
    directory.ready = ["127.0.0.1"]
    activator = await started(directory, port)
    try:
        async with aiohttp.ClientSession() as session, session.post(
            f"http://127.0.0.1:{activator.port}/v1/completions",
            data=b'{"prompt": "hi"}',
            headers=[("Host", HOST), ("Connection", "X-Secret"), ("X-Secret", "hop"),
                     ("X-Tag", "a"), ("X-Tag", "b"), ("X-Forwarded-For", "10.9.9.9")],
        ) as resp:  # fmt: skip
            assert resp.status == 200 and resp.headers["Connection"] == "close"
    finally:
        await activator.stop()
    (seen,) = fake.seen
    assert "X-Secret" not in seen["headers"]  # named by Connection: hop-by-hop
    assert seen["headers"]["X-Forwarded-For"] == "10.9.9.9, 127.0.0.1"
    kept = end_to_end(_multi([("X-Tag", "a"), ("X-Tag", "b"), ("Connection", "x-tag")]))
    assert kept.getall("X-Tag", []) == []
    kept = end_to_end(_multi([("X-Tag", "a"), ("X-Tag", "b")]))
    assert kept.getall("X-Tag") == ["a", "b"]


async def test_a_502_names_no_pod_address():
    directory = Directory()
    directory.ready = ["127.0.0.1"]
    activator = await started(directory, engine_port=1)
    try:
        status, _, body = await post(activator, {"prompt": "hi"})
    finally:
        await activator.stop()
    assert status == 502 and "127.0.0.1" not in json.loads(body)["error"]["message"]


async def test_the_activator_binds_the_pod_ips_family():
    assert listen_host("fd00::5") == "::"
    assert listen_host("10.1.2.3") == "0.0.0.0"


def _multi(pairs):
    from multidict import CIMultiDict

    return CIMultiDict(pairs)
