"""Many teams, one base model (issue 10's done-when), against a real kube-apiserver: a platform
namespace `llm-*` whose base admits namespaces by label, team namespaces `a-*` (labelled) and
`b-*` (not), the operator watching all three and the base's pod run by the local pod runner as
a real `loraplex serve` process on the tiny Llama. Then the team role, checked by the API
server's own RBAC (`kubectl auth can-i`).

The tests share one setup and run in file order, each starting from the state the one before left.
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from kopf.testing import KopfRunner
from kubernetes import client

from loraplex.localcluster.control_plane import LocalCluster
from loraplex.localcluster.demo_workload import Workload, build_workload
from loraplex.localcluster.pod_runner import PodRunner
from loraplex.localcluster.processes import wait_until

pytestmark = pytest.mark.envtest
GROUP, VERSION = "loraplex.dev", "v1alpha1"
BASE, SELECTOR = "tiny-llama", "app.kubernetes.io/instance=tiny-llama"
TEAM_KEY, TEAM_KEY_ROTATED = "team-a-key-5d0c2f9b7e41", "team-a-key-rotated-8e1f"
REPO = Path(__file__).resolve().parents[2]


@dataclass
class Teams:
    cluster: LocalCluster
    llm: str
    a: str
    b: str
    label: str  # the namespace label the base admits
    core: client.CoreV1Api
    objects: client.CustomObjectsApi
    runner: PodRunner
    workload: Workload

    def adapter(self, namespace: str) -> dict[str, Any]:
        body = self.objects.get_namespaced_custom_object(GROUP, VERSION, namespace, "loraadapters", "sql")
        return body.get("status", {})

    def accepted(self, namespace: str) -> dict[str, Any]:
        conditions = self.adapter(namespace).get("conditions", [])
        return next((c for c in conditions if c["type"] == "Accepted"), {})

    def label_namespace(self, namespace: str, admitted: bool) -> None:
        value = f"{self.label}=yes" if admitted else f"{self.label}-"
        self.cluster.kubectl("label", "namespace", namespace, value, "--overwrite")

    def pod_url(self) -> str:
        items = self.core.list_namespaced_pod(self.llm, label_selector=SELECTOR).items
        (pod,) = [item for item in items if not item.metadata.deletion_timestamp]
        return f"http://{self.runner.worker(self.llm, pod.metadata.name).ip}:8080"

    def served(self) -> set[str]:
        """Every name the pod answers to (served names and aliases) of its ready adapters."""
        try:
            _, body = http("GET", f"{self.pod_url()}/v1/adapters")
        except (OSError, ValueError):
            return set()
        return {name for a in body["data"] if a["state"] == "ready" for name in (a["name"], *a["aliases"])}

    def access_document(self) -> dict[str, Any]:
        secret = self.core.read_namespaced_secret(f"{BASE}-access", self.llm)
        return json.loads(base64.b64decode(secret.data["keys.json"]))


def http(
    method: str, url: str, body: dict[str, Any] | None = None, key: str | None = None
) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(url, data, headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def generate(teams: Teams, adapter: str) -> int:
    parameters = {"max_new_tokens": 3, "adapter_id": adapter}
    body = {"inputs": "the model serves", "parameters": parameters}
    return http("POST", f"{teams.pod_url()}/generate", body, TEAM_KEY)[0]


def secret(name: str, value: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}, "stringData": {"key": value}}


def adapter(weights: Path, llm: str, **spec: Any) -> dict[str, Any]:
    body = {"baseModel": {"name": BASE, "namespace": llm}, "source": {"uri": f"file://{weights}"}, **spec}
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "LoraAdapter",
        "metadata": {"name": "sql"},
        "spec": body,
    }


def base_model(workload: Workload, label: str) -> dict[str, Any]:
    spec = {
        "model": {"id": f"file://{workload.model_dir}"},
        "replicas": 1,
        "engine": {"maxLoraRank": 16},
        "resources": {"cpu": "1", "memory": "2Gi", "ephemeralStorage": "2Gi"},
        "adapterNamespaces": {"from": "Selector", "selector": {"matchLabels": {label: "yes"}}},
    }
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "BaseModelDeployment",
        "metadata": {"name": BASE},
        "spec": spec,
    }


@pytest.fixture(scope="module")
def teams(
    local_cluster: LocalCluster, crds: None, tmp_path_factory: pytest.TempPathFactory, trained_assets: Any
) -> Iterator[Teams]:
    suffix = uuid.uuid4().hex[:6]
    llm, a, b = f"llm-{suffix}", f"a-{suffix}", f"b-{suffix}"
    for namespace in (llm, a, b):
        local_cluster.kubectl("create", "namespace", namespace)
    workload = build_workload(trained_assets.root.parent)
    env = {"OMP_NUM_THREADS": "1", "LOG_FORMAT": "text", "LOG_LEVEL": "warning"}
    args = ["run", "--standalone", "--namespace", llm, "--namespace", a, "--namespace", b]
    with (
        local_cluster.api_client() as api,
        PodRunner(api, Path(tmp_path_factory.mktemp("pods")), (llm,), SELECTOR, extra_env=env) as runner,
        KopfRunner(
            [*args, "-m", "loraplex.operator.handlers"], timeout=90, env={"LORAPLEX_TICK_SECONDS": "2"}
        ) as operator,
    ):
        try:
            yield Teams(
                local_cluster,
                llm,
                a,
                b,
                f"llm-access-{suffix}",
                client.CoreV1Api(api),
                client.CustomObjectsApi(api),
                runner,
                workload,
            )
        finally:
            for namespace in (llm, a, b):
                local_cluster.kubectl("delete", "namespace", namespace, "--wait=false")
    assert operator.exception is None, operator.output
    assert TEAM_KEY not in operator.output and TEAM_KEY_ROTATED not in operator.output


def apply(teams: Teams, namespace: str, body: dict[str, Any]) -> None:
    teams.cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(body))


def test_selector_admits_a_and_refuses_b(teams: Teams) -> None:
    teams.label_namespace(teams.a, admitted=True)
    apply(teams, teams.llm, base_model(teams.workload, teams.label))
    apply(teams, teams.a, secret("team-a", TEAM_KEY))
    refs = {"apiKeySecretRefs": [{"name": "team-a", "key": "key"}]}
    apply(teams, teams.a, adapter(teams.workload.adapters["sql"], teams.llm, access=refs))
    apply(teams, teams.b, adapter(teams.workload.adapters["support"], teams.llm))
    assert wait_until(lambda: teams.adapter(teams.a).get("phase") == "Ready", timeout=120), teams.adapter(
        teams.a
    )
    assert wait_until(lambda: teams.accepted(teams.b).get("reason") == "NotAllowed", timeout=30)
    assert teams.accepted(teams.b)["status"] == "False" and teams.adapter(teams.b)["phase"] == "Pending"
    assert {"sql", f"{teams.a}/sql"} <= teams.served() and f"{teams.b}/sql" not in teams.served()
    assert generate(teams, f"{teams.a}/sql") == 200
    assert generate(teams, f"{teams.b}/sql") == 404
    keys = next(c for c in teams.adapter(teams.a)["conditions"] if c["type"] == "AccessKeys")
    assert (keys["status"], keys["reason"]) == ("True", "KeysFound")
    # usage for charge-back: the pod's per-adapter totals, summed into the adapter's status
    assert wait_until(lambda: teams.adapter(teams.a).get("tokens", {}).get("generated", 0) >= 3, timeout=30)
    assert teams.adapter(teams.a)["tokens"]["prompt"] > 0


def test_pods_get_digests_only(teams: Teams) -> None:
    document = teams.access_document()
    assert set(document["adapters"]) == {"sql"} and len(document["adapters"]["sql"]) == 1
    bmd = teams.objects.get_namespaced_custom_object(GROUP, VERSION, teams.llm, "basemodeldeployments", BASE)
    configmap = teams.core.read_namespaced_config_map(f"{BASE}-adapters", teams.llm).data
    metrics = urllib.request.urlopen(f"{teams.pod_url()}/metrics", timeout=10).read().decode()
    everything = (
        json.dumps([document, teams.adapter(teams.a), teams.adapter(teams.b), bmd, configmap]) + metrics
    )
    for worker in list(teams.runner.workers.values()):
        everything += worker.plan.log_path.read_text(errors="replace")  # the server's own log
    assert TEAM_KEY not in everything


def test_rotating_the_team_secret_rewrites_the_digests(teams: Teams) -> None:
    before = teams.access_document()["adapters"]["sql"]
    apply(teams, teams.a, secret("team-a", TEAM_KEY_ROTATED))
    assert wait_until(lambda: teams.access_document()["adapters"]["sql"] != before, timeout=30)
    assert teams.access_document()["salt"]  # unchanged salt, new digest: only the key moved


def test_relabelling_b_admits_it_without_a_restart(teams: Teams) -> None:
    teams.label_namespace(teams.b, admitted=True)
    assert wait_until(lambda: teams.accepted(teams.b).get("status") == "True", timeout=30), teams.adapter(
        teams.b
    )
    # `sql` is a's: b's adapter is served under its qualified name, the clash is a condition
    assert teams.accepted(teams.b)["reason"] == "NameConflict"
    assert wait_until(lambda: teams.adapter(teams.b).get("phase") == "Ready", timeout=60), teams.adapter(
        teams.b
    )
    assert f"{teams.b}/sql" in teams.served()
    assert generate(teams, f"{teams.b}/sql") == 200


def test_removing_as_label_unloads_its_adapter(teams: Teams) -> None:
    teams.label_namespace(teams.a, admitted=False)
    assert wait_until(lambda: teams.accepted(teams.a).get("reason") == "NotAllowed", timeout=30)
    assert wait_until(lambda: f"{teams.a}/sql" not in teams.served(), timeout=60), teams.served()
    assert generate(teams, f"{teams.a}/sql") == 404
    # b no longer clashes: it takes the bare name too
    assert wait_until(lambda: teams.adapter(teams.b).get("servedName") == "sql", timeout=30)
    assert wait_until(lambda: {"sql", f"{teams.b}/sql"} <= teams.served(), timeout=60), teams.served()


def can_i(teams: Teams, verb: str, resource: str, namespace: str, *extra: str) -> bool:
    result = teams.cluster.kubectl(
        "auth", "can-i", verb, resource, "-n", namespace, "--as", "team-a-dev", *extra, check=False
    )
    return result.stdout.strip() == "yes"


def test_the_team_role_reaches_its_own_namespace_only(teams: Teams) -> None:
    teams.cluster.kubectl("apply", "-f", str(REPO / "manifests/rbac/adapter-editor.yaml"))
    teams.cluster.kubectl(
        "create",
        "rolebinding",
        "team-a-adapters",
        "-n",
        teams.a,
        "--clusterrole=loraplex-adapter-editor",
        "--user=team-a-dev",
    )
    assert wait_until(lambda: can_i(teams, "create", "loraadapters.loraplex.dev", teams.a), timeout=10)
    assert can_i(teams, "delete", "loraadapters.loraplex.dev", teams.a)
    assert can_i(teams, "create", "secrets", teams.a)
    assert not can_i(teams, "create", "loraadapters.loraplex.dev", teams.b)
    assert not can_i(teams, "get", "secrets", teams.b)
    assert not can_i(teams, "patch", "basemodeldeployments.loraplex.dev", teams.llm)
    assert not can_i(teams, "patch", "basemodeldeployments.loraplex.dev", teams.a)
    assert not can_i(teams, "get", "secrets", teams.llm)
    assert not can_i(teams, "patch", "loraadapters.loraplex.dev", teams.a, "--subresource=status")
    assert not can_i(teams, "create", "deployments.apps", teams.a)
    assert not can_i(teams, "update", "namespaces", teams.a)
