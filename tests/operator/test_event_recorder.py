"""The Event recorder against a fake events API: repeats folded into one Event within the
window, expired Events written again, and a refusing, stalled or overflowing events API that
never blocks or fails the caller."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from metroline.operator.events import EventNote
from metroline.operator.kube import ApiError
from metroline.operator.recorder import EventRecorder

from .conftest import live_body

NOW = "2026-11-26T08:00:00Z"


class FakeEventsApi:
    """Records creates and patches; can refuse, stall or forget events."""

    def __init__(self) -> None:
        self.created: list[dict[str, Any]] = []
        self.patched: list[tuple[str, dict[str, Any]]] = []
        self.fail_with: ApiError | None = None
        self.stall_s = 0.0
        self.expired: set[str] = set()

    async def create_event(self, event: dict[str, Any]) -> dict[str, Any]:
        await asyncio.sleep(self.stall_s)
        if self.fail_with is not None:
            raise self.fail_with
        self.created.append(event)
        return event

    async def patch_event(self, namespace: str, name: str, patch: dict[str, Any]) -> dict:
        if name in self.expired:
            raise ApiError(404, "NotFound", "events not found")
        self.patched.append((name, patch))
        return patch


def recorder_with(api: FakeEventsApi, **knobs: Any) -> tuple[EventRecorder, list[float]]:
    now = [1000.0]
    recorder = EventRecorder(api, lambda: NOW, "op-0", monotonic=lambda: now[0], **knobs)  # type: ignore[arg-type]
    return recorder, now


CRASH = EventNote("Warning", "CrashLoopBackOff", "Ready is False: pod llama-0: CrashLoopBackOff")


@pytest.mark.asyncio
async def test_repeats_fold_into_one_event_within_the_window():
    api = FakeEventsApi()
    recorder, now = recorder_with(api, window_s=600)
    recorder.start()
    for _ in range(3):
        recorder.record(live_body(), CRASH)
        await recorder.idle()
        now[0] += 100
    assert len(api.created) == 1
    name = api.created[0]["metadata"]["name"]
    assert api.patched == [(name, {"count": 2, "lastTimestamp": NOW}),
                           (name, {"count": 3, "lastTimestamp": NOW})]  # fmt: skip
    now[0] += 601  # quiet for longer than the window: a new Event
    recorder.record(live_body(), CRASH)
    api.expired.add(name)
    recorder.record(live_body(), CRASH)  # the new one is fresh: patched, not expired
    other = EventNote("Normal", "Recovered", "Degraded is False (was CrashLoopBackOff)")
    recorder.record(live_body(), other)
    await recorder.idle()
    assert [e["reason"] for e in api.created] == ["CrashLoopBackOff", "CrashLoopBackOff",
                                                  "Recovered"]  # fmt: skip
    assert api.patched[-1] == (api.created[1]["metadata"]["name"],
                               {"count": 2, "lastTimestamp": NOW})  # fmt: skip
    await recorder.stop()


@pytest.mark.asyncio
async def test_an_expired_event_is_written_again():
    api = FakeEventsApi()
    recorder, _ = recorder_with(api)
    recorder.start()
    recorder.record(live_body(), CRASH)
    await recorder.idle()
    api.expired.add(api.created[0]["metadata"]["name"])
    recorder.record(live_body(), CRASH)
    await recorder.idle()
    assert len(api.created) == 2 and api.patched == []
    assert api.created[0]["metadata"]["name"] != api.created[1]["metadata"]["name"]
    await recorder.stop()


@pytest.mark.asyncio
async def test_refused_stalled_or_overflowing_events_never_block_or_raise():
    api = FakeEventsApi()
    recorder, _ = recorder_with(api, timeout_s=0.05, queue_size=2)
    recorder.start()
    api.fail_with = ApiError(403, "Forbidden", "events is forbidden")
    recorder.record(live_body(), CRASH)
    await recorder.idle()
    assert api.created == []
    api.fail_with, api.stall_s = None, 10.0
    loop = asyncio.get_running_loop()
    started = loop.time()
    for index in range(5):  # one in flight, two queued, two dropped
        recorder.record(live_body(), EventNote("Normal", "Created", f"created thing {index}"))
    assert loop.time() - started < 1.0  # record() returned at once, not after a 10 s write
    assert recorder.dropped >= 2
    await asyncio.wait_for(recorder.idle(), 5)  # each stalled write timed out
    api.stall_s = 0.0
    recorder.record(live_body(), CRASH)
    await recorder.idle()
    assert [e["reason"] for e in api.created] == ["CrashLoopBackOff"]  # still working
    await recorder.stop()
