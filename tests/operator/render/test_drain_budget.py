"""The drain budget the operator renders: delay + timeout fit the grace period with 5 s to spare."""

from __future__ import annotations

import pytest

from loraplex.operator.render import RenderOptions, build_deployment
from loraplex.operator.render.deployment import DRAIN_MARGIN_SECONDS, check_drain_budget

OPTIONS = RenderOptions(default_image="example.com/loraplex:1")


def test_rendered_drain_fits_the_grace_period_and_liveness_uses_health(bmd) -> None:
    pod = build_deployment(bmd, OPTIONS)["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {item["name"]: item.get("value") for item in container["env"]}
    drain = float(env["SHUTDOWN_DELAY"]) + float(env["SHUTDOWN_TIMEOUT"])
    assert drain <= pod["terminationGracePeriodSeconds"] - DRAIN_MARGIN_SECONDS
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"


@pytest.mark.parametrize(("delay", "timeout", "grace"), [(5, 90, 99), (5, 111, 120), (-1, 10, 120)])
def test_a_budget_that_overruns_the_grace_period_is_refused(
    delay: float, timeout: float, grace: float
) -> None:
    with pytest.raises(ValueError, match="drain budget"):
        check_drain_budget(delay, timeout, grace)


def test_the_budget_may_use_the_whole_grace_period_but_the_margin() -> None:
    check_drain_budget(5, 110, 120)
