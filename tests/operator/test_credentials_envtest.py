"""source.credentialsSecretRef end to end, against a real kube-apiserver, moto's S3 server (signatures
checked) and a real `loraplex serve` pod run by the local pod runner: the operator copies only the
named keys into `<base>-credentials`, the pod loads the adapter with them, wrong keys fail with
the store's reason in the adapter's status, and no other key of the user's Secret reaches the pod."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kopf.testing import KopfRunner
from kubernetes import client

from loraplex.localcluster.demo_workload import build_workload
from loraplex.localcluster.pod_runner import PodRunner
from loraplex.localcluster.processes import wait_until

pytestmark = pytest.mark.envtest
GROUP, VERSION = "loraplex.dev", "v1alpha1"
BASE, SELECTOR = "tiny-llama", "app.kubernetes.io/instance=tiny-llama"
UNRELATED = "unrelated-value-3f9a1c"


def _apply(cluster, namespace: str, body: dict[str, Any]) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(body))


def _secret(name: str, data: dict[str, str]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}, "stringData": data}


def _adapter(name: str, uri: str, secret: str) -> dict[str, Any]:
    spec = {"baseModel": {"name": BASE}, "source": {"uri": uri, "credentialsSecretRef": {"name": secret}}}
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "LoraAdapter",
        "metadata": {"name": name},
        "spec": spec,
    }


@pytest.fixture(scope="module")
def setup(local_cluster, crds, s3_server, tmp_path_factory, trained_assets) -> Iterator[dict[str, Any]]:
    namespace = f"creds-{uuid.uuid4().hex[:6]}"
    local_cluster.kubectl("create", "namespace", namespace)
    workload = build_workload(trained_assets.root.parent)
    bucket = f"creds-{uuid.uuid4().hex[:6]}"
    s3 = s3_server.client()
    s3.create_bucket(Bucket=bucket)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        s3.put_object(Bucket=bucket, Key=f"poem/{name}", Body=(workload.adapters["poem"] / name).read_bytes())
    # The pod's own chain holds wrong keys: only the copied ones can work.
    env = {
        "OMP_NUM_THREADS": "1",
        "LOG_FORMAT": "text",
        "LOG_LEVEL": "warning",
        "AWS_ENDPOINT_URL_S3": s3_server.endpoint,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": "AKIAPODDEFAULTCHAIN0",
        "AWS_SECRET_ACCESS_KEY": "wrong",
    }
    pods = Path(tmp_path_factory.mktemp("pods"))
    base = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "BaseModelDeployment",
        "metadata": {"name": BASE},
        "spec": {
            "model": {"id": f"file://{workload.model_dir}"},
            "engine": {"maxLoraRank": 16},
            "resources": {"cpu": "1", "memory": "2Gi", "ephemeralStorage": "2Gi"},
        },
    }
    with (
        local_cluster.api_client() as api,
        PodRunner(api, pods, (namespace,), SELECTOR, extra_env=env),
        KopfRunner(
            ["run", "--standalone", "--namespace", namespace, "-m", "loraplex.operator.handlers"],
            timeout=90,
            env={"LORAPLEX_TICK_SECONDS": "2"},
        ) as operator,
    ):
        try:
            _apply(local_cluster, namespace, base)
            yield {
                "cluster": local_cluster,
                "ns": namespace,
                "bucket": bucket,
                "s3": s3_server,
                "core": client.CoreV1Api(api),
                "objects": client.CustomObjectsApi(api),
                "pods": pods,
            }
        finally:
            local_cluster.kubectl("delete", "namespace", namespace, "--wait=false")
    assert operator.exception is None, operator.output
    assert s3_server.secret_key not in operator.output and UNRELATED not in operator.output


def _status(setup: dict[str, Any], name: str) -> dict[str, Any]:
    body = setup["objects"].get_namespaced_custom_object(GROUP, VERSION, setup["ns"], "loraadapters", name)
    return body.get("status", {})


def test_named_keys_load_the_adapter_and_nothing_else_reaches_the_pod(setup) -> None:
    keys = {
        "AWS_ACCESS_KEY_ID": setup["s3"].access_key,
        "AWS_SECRET_ACCESS_KEY": setup["s3"].secret_key,
        "ssh-privatekey": UNRELATED,
    }
    _apply(setup["cluster"], setup["ns"], _secret("s3-reader", keys))
    _apply(setup["cluster"], setup["ns"], _adapter("sql", f"s3://{setup['bucket']}/poem", "s3-reader"))
    assert wait_until(lambda: _status(setup, "sql").get("phase") == "Ready", timeout=240), _status(
        setup, "sql"
    )

    copy = setup["core"].read_namespaced_secret(f"{BASE}-credentials", setup["ns"]).data
    assert set(copy) == {"sql.AWS_ACCESS_KEY_ID", "sql.AWS_SECRET_ACCESS_KEY"}
    assert base64.b64decode(copy["sql.AWS_SECRET_ACCESS_KEY"]).decode() == setup["s3"].secret_key
    (pod,) = setup["core"].list_namespaced_pod(setup["ns"], label_selector=SELECTOR).items
    mounted = [v.secret.secret_name for v in pod.spec.volumes if v.secret]
    assert "s3-reader" not in mounted and f"{BASE}-credentials" in mounted
    on_disk = b"".join(
        p.read_bytes() for p in setup["pods"].rglob("*") if p.is_file() and p.stat().st_size < 1 << 20
    )
    assert UNRELATED.encode() not in on_disk


def test_wrong_keys_fail_with_the_reason_in_the_status(setup) -> None:
    keys = {"AWS_ACCESS_KEY_ID": setup["s3"].access_key, "AWS_SECRET_ACCESS_KEY": "not-the-secret"}
    _apply(setup["cluster"], setup["ns"], _secret("s3-wrong", keys))
    _apply(setup["cluster"], setup["ns"], _adapter("chat", f"s3://{setup['bucket']}/poem", "s3-wrong"))

    def failed_with_reason() -> bool:
        status = _status(setup, "chat")
        return status.get("phase") == "Failed" and "credentials" in json.dumps(status)

    assert wait_until(failed_with_reason, timeout=240), _status(setup, "chat")
    assert _status(setup, "sql").get("phase") == "Ready"  # the other tenant is untouched
