"""The status writer: the base's status first, a newer status replaces a queued one, a write
already made over the same stored status is not repeated, and the loop sees its own writes."""

from __future__ import annotations

import asyncio

from loraplex.operator.plan import StatusPatch
from loraplex.operator.writer import StatusWriter


class RecordingKube:
    """Records status PATCHes (the Kubernetes boundary; the writer is what is tested)."""

    def __init__(self) -> None:
        self.patches: list[tuple[str, str, dict]] = []
        self.gate = asyncio.Event()

    async def patch_status(self, plural: str, namespace: str, name: str, status: dict) -> None:
        await self.gate.wait()
        self.patches.append((plural, name, status))


def patch(plural: str, name: str, phase: str) -> StatusPatch:
    return StatusPatch(plural, "llm", name, {"phase": phase}, seen={})


async def test_base_first_latest_wins_and_no_repeat() -> None:
    kube = RecordingKube()
    writer = StatusWriter(kube, concurrency=1)  # type: ignore[arg-type]
    for i in range(3):
        writer.submit(patch("loraadapters", f"a{i}", "Loading"))
    writer.submit(patch("loraadapters", "a1", "Ready"))  # replaces the queued Loading
    writer.submit(patch("basemodeldeployments", "gemma", "Degraded"), first=True)
    assert writer.latest(("loraadapters", "llm", "a1"), {}) == {"phase": "Ready"}
    await asyncio.sleep(0)
    kube.gate.set()
    await writer.idle()
    await asyncio.sleep(0.01)
    names = [name for _, name, _ in kube.patches]
    assert names == ["gemma", "a0", "a1", "a2"]  # submitted last, written first
    assert ("loraadapters", "a1", {"phase": "Ready"}) in kube.patches
    assert len(kube.patches) == 4  # a1 written once, with its latest status
    writer.submit(patch("loraadapters", "a1", "Ready"))  # same status over the same stored one
    await asyncio.sleep(0.01)
    assert len(kube.patches) == 4
    # until the watch shows it, the loop sees its own write; then the stored status again
    assert writer.latest(("loraadapters", "llm", "a1"), {}) == {"phase": "Ready"}
    assert writer.latest(("loraadapters", "llm", "a1"), {"phase": "Ready"}) is None
    await writer.close()


async def test_a_write_in_flight_is_not_repeated_and_the_loop_sees_it() -> None:
    """A pass that plans the same status while its PATCH is still running (a slow API server)
    neither writes it twice nor reads the old status back."""
    kube = RecordingKube()
    writer = StatusWriter(kube, concurrency=4)  # type: ignore[arg-type]
    writer.submit(patch("loraadapters", "a0", "Ready"))
    await asyncio.sleep(0.01)  # picked up: in flight, held at the gate
    assert writer.in_flight == {("loraadapters", "llm", "a0")}
    assert writer.latest(("loraadapters", "llm", "a0"), {}) == {"phase": "Ready"}
    writer.submit(patch("loraadapters", "a0", "Ready"))  # the next pass plans it again
    assert not writer.pending
    kube.gate.set()
    await writer.idle()
    assert len(kube.patches) == 1
    writer.forget_except(set(), "loraadapters")  # a0 was deleted: its record goes
    assert writer.latest(("loraadapters", "llm", "a0"), {}) is None
    await writer.close()


def ready_on(*pods: str) -> dict:
    return {"readyReplicas": len(pods), "instances": [{"pod": pod, "state": "Ready"} for pod in pods]}


async def test_retractions_go_before_new_ready_claims() -> None:
    """A pod died while adapters loaded on its replacement: the statuses that stop calling the
    dead pod Ready are written before the queued ones that add a Ready claim, and a retraction
    of an adapter already queued with news moves it up (written once, with its latest status)."""
    kube = RecordingKube()
    writer = StatusWriter(kube, concurrency=1)  # type: ignore[arg-type]
    for i in range(3):  # news: Ready on one more pod
        writer.submit(
            StatusPatch("loraadapters", "llm", f"new{i}", ready_on("p0", "p1"), seen=ready_on("p0"))
        )
    for i in range(2):  # retractions: p1 is gone
        writer.submit(
            StatusPatch("loraadapters", "llm", f"old{i}", ready_on("p0"), seen=ready_on("p0", "p1"))
        )
    # the same count on another pod is a retraction too (p1 no longer claimed)
    writer.submit(
        StatusPatch("loraadapters", "llm", "moved", ready_on("p0", "p2"), seen=ready_on("p0", "p1"))
    )
    # new1 is queued with news, then its latest status takes a claim back: it moves up
    writer.submit(StatusPatch("loraadapters", "llm", "new1", ready_on(), seen=ready_on("p0")))
    writer.submit(patch("basemodeldeployments", "gemma", "Degraded"), first=True)
    await asyncio.sleep(0)
    kube.gate.set()
    await writer.idle()
    names = [name for _, name, _ in kube.patches]
    assert names == ["gemma", "old0", "old1", "moved", "new1", "new0", "new2"]
    assert kube.patches[4][2] == ready_on()
    await writer.close()
