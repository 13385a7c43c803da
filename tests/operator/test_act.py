"""Engine calls of one pass against fake pods over real HTTP: list, plan, load/unload, report."""

from __future__ import annotations

from typing import Any

import pytest

from loraplex.operator.desired import DesiredAdapter
from loraplex.operator.engine_client import EngineClient, EngineTimeouts
from loraplex.operator.lora import InstanceState, LoraAdapterStatus, LoraPhase
from loraplex.operator.status import lora_status

SQL = DesiredAdapter(name="sql", source="hf://org/sql")
CHAT = DesiredAdapter(name="chat", source="hf://org/chat", pinned=True)
BAD = DesiredAdapter(name="bad", source="hf://org/rank-128")
NOW = 1_800_000_000.0


def body(name: str, port: int, restarts: int = 0, ip: str | None = "127.0.0.1") -> dict[str, Any]:
    running = {"running": {"startedAt": f"2026-11-22T10:0{restarts}:00Z"}}
    return {
        "metadata": {"name": name},
        "spec": {"containers": [{"name": "server", "ports": [{"name": "http", "containerPort": port}]}]},
        "status": {
            "podIP": ip,
            "conditions": [{"type": "Ready", "status": "True"}],
            "containerStatuses": [{"name": "server", "restartCount": restarts, "state": running}],
        },
    }


@pytest.fixture
def converge(engine_pass):
    async def run(desired, bodies, attempts=None, now=NOW):
        async with EngineClient(EngineTimeouts(connect_s=1, request_s=2, load_s=2)) as engine:
            return await engine_pass(engine, desired, bodies, attempts, now)

    return run


async def test_loads_missing_adapters_on_every_pod(start_fake_pod, converge) -> None:
    a, b = await start_fake_pod(), await start_fake_pod()
    b.adapters["old"] = {"name": "old", "source": "hf://org/old", "state": "ready"}
    result = await converge({"sql": SQL, "chat": CHAT}, [body("a", a.port), body("b", b.port)])
    assert result.acted
    assert sorted(a.adapters) == sorted(b.adapters) == ["chat", "sql"]  # `old` unloaded from b
    assert a.adapters["chat"]["pinned"] is True
    assert {pod.name: sorted(r.name for r in pod.reports) for pod in result.pods} == {
        "a": ["chat", "sql"],
        "b": ["chat", "sql"],
    }
    again = await converge({"sql": SQL, "chat": CHAT}, [body("a", a.port), body("b", b.port)])
    assert not again.acted and len(a.loads) == 2  # converged: nothing reloaded


async def test_refused_adapter_backs_off_and_others_stay_ready(start_fake_pod, converge) -> None:
    pod = await start_fake_pod()
    desired = {"sql": SQL, "bad": BAD}
    first = await converge(desired, [body("a", pod.port)])
    attempt = first.attempts[("a", "bad")]
    assert (attempt.attempts, attempt.error_type) == (1, "rank_exceeds_max")
    assert "sql" in pod.adapters and "bad" not in pod.adapters
    status = lora_status(BAD, 1, first.pods, {"a": attempt}, LoraAdapterStatus(), NOW)
    assert status.phase == LoraPhase.FAILED
    assert status.instances[0].last_error == "rank 128 exceeds max_lora_rank 64"
    loads = len(pod.loads)
    await converge(desired, [body("a", pod.port)], first.attempts, now=NOW + 1)
    assert len(pod.loads) == loads  # still backing off
    retried = await converge(desired, [body("a", pod.port)], first.attempts, now=attempt.next_attempt_at)
    assert retried.attempts[("a", "bad")].attempts == 2


async def test_restarted_engine_is_reloaded(start_fake_pod, converge) -> None:
    pod = await start_fake_pod()
    await converge({"sql": SQL}, [body("a", pod.port)])
    pod.adapters.clear()  # the process restarted: an empty engine
    result = await converge({"sql": SQL}, [body("a", pod.port, restarts=1)])
    assert "sql" in pod.adapters
    assert result.pods[0].epoch == "1@2026-11-22T10:01:00Z"


async def test_unreachable_and_unstarted_pods_are_reported_not_fatal(start_fake_pod, converge) -> None:
    up = await start_fake_pod()
    gone = await start_fake_pod()
    bodies = [body("up", up.port), body("gone", gone.port), body("new", 1, ip=None)]
    await gone.server.close()  # a crashed server process: connection refused
    result = await converge({"sql": SQL}, bodies)
    pods = {pod.name: pod for pod in result.pods}
    assert pods["up"].reachable and "sql" in up.adapters
    assert not pods["gone"].reachable and gone.url in pods["gone"].error
    assert pods["new"].reports is None and pods["new"].error is None
    status = lora_status(SQL, 1, result.pods, {}, LoraAdapterStatus(), NOW)
    assert [i.state for i in status.instances] == [
        InstanceState.PENDING,
        InstanceState.PENDING,
        InstanceState.READY,
    ]


async def test_busy_pod_keeps_its_reports_and_is_retried_later(start_fake_pod, converge) -> None:
    pod = await start_fake_pod()
    pod.busy = True
    result = await converge({"sql": SQL}, [body("a", pod.port)])
    assert not result.pods[0].reachable and "queue full" in result.pods[0].error
    assert result.attempts == {}  # busy is not the adapter's fault: no backoff recorded


class RecordingKube:
    """Kubernetes writes as act issues them (act's bookkeeping is what is tested here; the real
    API server runs in the envtests, e.g. test_autoscaling_envtest)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, ...]] = []

    async def apply(self, body: dict[str, Any]) -> None:
        self.calls.append(("apply", body["kind"], body["metadata"]["name"]))

    async def delete(self, api_version: str, kind: str, namespace: str, name: str) -> None:
        self.calls.append(("delete", kind, name))

    async def set_pod_condition(self, namespace: str, name: str, condition: dict[str, Any]) -> None:
        self.calls.append(("gate", name, condition["status"]))


async def test_children_deletes_and_gates_are_written_once_off_the_pass() -> None:
    import asyncio

    from loraplex.operator.act import Actor, BaseState, act
    from loraplex.operator.plan import GatePatch, Plan
    from loraplex.operator.writer import StatusWriter

    kube = RecordingKube()
    state = BaseState(writer=StatusWriter(kube))
    actor = Actor(kube=kube, engine=None, state=state, wake=lambda: None)
    children = ({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "gemma-adapters"}},)
    gate = GatePatch("a", {"status": "True", "reason": "AdaptersLoaded", "message": "engine epoch 1"})
    plan = Plan(
        namespace="llm",
        base="gemma",
        children=children,
        deletes=(("autoscaling/v2", "HorizontalPodAutoscaler"),),
        gates=(gate,),
    )
    for _ in range(3):  # the watch has not shown the writes yet: the same plan again
        await act(actor, plan, [])
        await asyncio.sleep(0.01)
    assert sorted(kube.calls) == [
        ("apply", "ConfigMap", "gemma-adapters"),
        ("delete", "HorizontalPodAutoscaler", "gemma"),
        ("gate", "a", "True"),
    ]
    state.forget_children()  # the spec changed: every child is compared again
    await act(actor, plan, [])
    await asyncio.sleep(0.01)
    assert kube.calls.count(("apply", "ConfigMap", "gemma-adapters")) == 2
    assert kube.calls.count(("delete", "HorizontalPodAutoscaler", "gemma")) == 2
    await state.cancel()
