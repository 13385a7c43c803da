"""`make demo`'s wait, ten times in a row on the local cluster: each round starts from pods that
are gone (deleted; the Deployment makes new ones, which load the model and their adapters) and
must end with every model answering on every endpoint the wait returned, on the new pods."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
from kopf.testing import KopfRunner

from loraplex.localcluster.control_plane import LocalCluster
from loraplex.localcluster.demo_wait import NotServing, Target, observe, refusal, wait_until_serving
from loraplex.localcluster.demo_workload import BASE_MODEL, SERVED, build_workload, manifest
from loraplex.localcluster.install import install_chart
from loraplex.localcluster.pod_runner import PodRunner
from loraplex.localcluster.processes import wait_until
from loraplex.server.demo_training import TrainedAssets

pytestmark = pytest.mark.envtest
ROUNDS, REPLICAS = 10, 2
PODS = f"app.kubernetes.io/instance={BASE_MODEL}"


def test_the_demo_wait_returns_only_when_everything_serves_ten_times_in_a_row(
    local_cluster: LocalCluster, trained_assets: TrainedAssets, tmp_path: Path
) -> None:
    install_chart(local_cluster)
    namespace = f"wait-{uuid.uuid4().hex[:6]}"
    local_cluster.kubectl("create", "namespace", namespace)
    workload = build_workload(trained_assets.root.parent)
    target = Target(namespace, BASE_MODEL, SERVED, REPLICAS)

    def kubectl(*args: str) -> str:
        return local_cluster.kubectl(*args).stdout

    def pod_uids() -> set[str]:
        """The live pods (a replaced pod can still be listed, terminating, when the new ones serve)."""
        pods = json.loads(kubectl("get", "pods", "-n", namespace, "-l", PODS, "-o", "json"))["items"]
        return {pod["metadata"]["uid"] for pod in pods if not pod["metadata"].get("deletionTimestamp")}

    operator_args = ["run", "--standalone", "--namespace", namespace, "-m", "loraplex.operator.handlers"]
    pods_env = {"OMP_NUM_THREADS": "1", "LOG_FORMAT": "text", "LOG_LEVEL": "warning"}
    log: list[str] = []
    with (
        local_cluster.api_client() as api,
        PodRunner(api, tmp_path / "pods", (namespace,), extra_env=pods_env),
        KopfRunner(operator_args, timeout=90, env={"LORAPLEX_TICK_SECONDS": "2"}) as operator,
    ):
        for name in ("base-model.yaml", "adapters.yaml"):
            local_cluster.kubectl("apply", "-n", namespace, "-f", "-", input=manifest(name, workload))
        old: set[str] = set()
        for round_ in range(ROUNDS):
            log.append(f"round {round_}")
            try:
                endpoints = wait_until_serving(kubectl, target, timeout_s=240, report=log.append)
            except NotServing as error:
                pytest.fail(f"round {round_}: {error}\n" + "\n".join(log[-30:]), pytrace=False)
            uids = pod_uids()
            assert len(endpoints) == REPLICAS and len(uids) == REPLICAS and not uids & old, (
                endpoints,
                uids,
                old,
            )
            for address in endpoints:  # what the demo does next works at once
                assert all(refusal(address, model) is None for model in (BASE_MODEL, *SERVED)), address
            old = uids
            local_cluster.kubectl("delete", "pods", "-n", namespace, "-l", PODS, "--wait=false")
            gone = wait_until(lambda: bool(observe(kubectl, target, probe=True).missing(target)), timeout=60)
            assert gone, "deleted pods still counted as serving"
    local_cluster.kubectl("delete", "namespace", namespace, "--wait=false")
    assert operator.exception is None, operator.output
