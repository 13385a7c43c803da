"""source.credentialsSecretRef: only the keys the source's scheme needs are copied from the user's
Secret into `<bmd>-credentials`; the pod mounts that Secret and never the user's."""

from __future__ import annotations

import base64
import json
from typing import Any

from loraplex.operator.admission import admit
from loraplex.operator.credentials import credential_refs, render_credentials
from loraplex.operator.render import RenderOptions, build_deployment
from loraplex.operator.render.credentials import CREDENTIALS_DIR, SCHEME_KEYS, credential_file, source_scheme
from loraplex.server.adapters import credentials as server_credentials


class Secrets:
    """The one Kube call this code makes (the API server's part is the envtest's)."""

    def __init__(self, secrets: dict[tuple[str, str], dict[str, str]]) -> None:
        self.secrets = secrets

    async def read_secret_key(self, namespace: str, name: str, key: str) -> str | None:
        return self.secrets.get((namespace, name), {}).get(key)


def lora(name: str, uri: str, secret: str | None = None, namespace: str = "llm") -> dict[str, Any]:
    source: dict[str, Any] = {"uri": uri}
    if secret:
        source["credentialsSecretRef"] = {"name": secret}
    meta = {
        "name": name,
        "namespace": namespace,
        "creationTimestamp": "2026-01-01T00:00:00Z",
        "generation": 1,
    }
    return {"metadata": meta, "spec": {"baseModel": {"name": "gemma"}, "source": source}}


USER_SECRETS = {
    ("llm", "gcs-key"): {"service-account.json": '{"type": "service_account"}', "unrelated": "do-not-copy"},
    ("llm", "aws"): {
        "AWS_ACCESS_KEY_ID": "AKIA1",
        "AWS_SECRET_ACCESS_KEY": "s3cret",
        "ssh-privatekey": "do-not-copy",
    },
}


async def test_only_the_named_keys_reach_the_pod(bmd) -> None:
    adapters = [
        lora("sql", "gs://models/sql", "gcs-key"),
        lora("chat", "s3://models/chat", "aws"),
        lora("open", "gs://public/open"),  # Workload Identity: no Secret at all
        lora("web", "https://example.org/a.tar.gz", "missing"),
    ]
    verdicts = admit(bmd, adapters, {})
    assert sorted(ref.served_name for ref in credential_refs(verdicts, adapters)) == ["chat", "sql", "web"]
    secret = await render_credentials(Secrets(USER_SECRETS), bmd, verdicts, adapters)
    data = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    assert data == {
        "sql.service-account.json": '{"type": "service_account"}',
        "chat.AWS_ACCESS_KEY_ID": "AKIA1",
        "chat.AWS_SECRET_ACCESS_KEY": "s3cret",
    }
    assert "do-not-copy" not in json.dumps(data)
    assert secret["metadata"]["name"] == "gemma-credentials"
    assert secret["metadata"]["ownerReferences"][0]["uid"] == "uid-1"


def test_pods_mount_the_copy_and_never_a_user_secret(bmd) -> None:
    pod = build_deployment(bmd, RenderOptions())["spec"]["template"]["spec"]
    secrets = [v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v]
    assert "gemma-credentials" in secrets and not {"gcs-key", "aws"} & set(secrets)
    (container,) = pod["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["CREDENTIALS_DIR"] == CREDENTIALS_DIR
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts[CREDENTIALS_DIR]["readOnly"] is True
    assert not any("valueFrom" in e and "gcs-key" in json.dumps(e) for e in container["env"])


def test_the_server_reads_what_the_operator_writes(tmp_path) -> None:
    """Contract: file names and the set of keys agree on both sides (the operator can't import the server)."""
    for name in ("sql", "a/sql", "team:chat", "v1.2-x"):
        for key in server_credentials.CREDENTIAL_KEYS:
            assert credential_file(name, key) == server_credentials.credential_file(name, key)
            assert "/" not in credential_file(name, key) and ":" not in credential_file(name, key)
    assert {key for keys in SCHEME_KEYS.values() for key, _ in keys} == set(
        server_credentials.CREDENTIAL_KEYS
    )
    (tmp_path / credential_file("a/sql", "token")).write_text("t0ken\n")
    assert server_credentials.read_credentials("a/sql", tmp_path) == {"token": "t0ken"}
    assert server_credentials.read_credentials("sql", tmp_path) == {}


def test_source_schemes() -> None:
    assert [source_scheme(u) for u in ("gs://b/p", "s3://b", "org/repo", "hf://o/r", "http://x", "/abs")] == [
        "gs",
        "s3",
        "hf",
        "hf",
        "https",
        "file",
    ]
