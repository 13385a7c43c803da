"""`loraplex operator explain`'s text: what was observed and the plan, including why an adapter
is not Ready on a pod."""

from __future__ import annotations

from test_decide import FAILED, observe, pod, report

from loraplex.operator.decide import decide
from loraplex.operator.explain import render, unwritten


def test_explain_shows_observation_plan_and_why_not_ready() -> None:
    observed = observe(pod("a", report("sql"), ready=False), FAILED)
    text = "\n".join(render(observed, decide(unwritten(observed))))
    assert "BaseModelDeployment llm/gemma" in text
    assert "pod a: running=True ready=False" in text
    assert "adapter llm/sql: Accepted as sql" in text
    assert "adapter llm/sql: Failed 0/2 [a=Pending (loaded; the pod is not Ready" in text
    assert "b=Failed (bad rank)" in text
    assert "pod a: readiness gate -> True (AdaptersLoaded)" in text
    assert "base: Degraded, readyReplicas 1" in text
