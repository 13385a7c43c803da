"""Multi-team pieces of the operator: qualified names, the access Secret (digests only, a
contract with the server's reader), its mount, and the token summary in status."""

from __future__ import annotations

import base64
import json
from typing import Any

from loraplex.operator.access import (
    access_document,
    digest_key,
    key_refs,
    read_salt,
    render_access,
    render_access_secret,
    salt_of,
)
from loraplex.operator.admission import admit, desired_set
from loraplex.operator.bmd import BaseModelDeployment
from loraplex.operator.desired import DesiredAdapter
from loraplex.operator.engine_client import AdapterReport
from loraplex.operator.lora import LoraAdapterStatus, TokenUsage
from loraplex.operator.pods import PodObservation
from loraplex.operator.render import RenderOptions, build_deployment
from loraplex.operator.status import lora_status
from loraplex.server.auth import AccessControl, AccessTable

SALT = bytes(range(16))
SELECTOR = {"from": "Selector", "selector": {"matchLabels": {"llm": "on"}}}
LABELS = {"a": {"llm": "on"}, "b": {"llm": "on"}}


def base(**spec: Any) -> BaseModelDeployment:
    body = {
        "metadata": {"name": "gemma", "namespace": "llm", "uid": "u"},
        "spec": {"model": {"id": "m"}, **spec},
    }
    return BaseModelDeployment.from_body(body)


def lora(name: str, namespace: str, created: str = "2026-01-01T00:00:00Z", **spec: Any) -> dict[str, Any]:
    full = {"baseModel": {"name": "gemma", "namespace": "llm"}, "source": {"uri": f"hf://org/{name}"}, **spec}
    meta = {"name": name, "namespace": namespace, "creationTimestamp": created, "generation": 1}
    return {"metadata": meta, "spec": full}


class FakeSecrets:
    """The one Kube call the access code makes; the API server's part is the envtest's."""

    def __init__(self, secrets: dict[tuple[str, str, str], str]) -> None:
        self.secrets = secrets
        self.reads: list[tuple[str, str, str]] = []

    async def read_secret_key(self, namespace: str, name: str, key: str) -> str | None:
        self.reads.append((namespace, name, key))
        return self.secrets.get((namespace, name, key))


def test_every_adapter_answers_to_its_qualified_name() -> None:
    (verdict,) = admit(base(adapterNamespaces=SELECTOR), [lora("sql", "a", servedName="s")], LABELS)
    assert verdict.reason == "Accepted"
    assert verdict.adapter is not None and verdict.adapter.name == "s" and "a/sql" in verdict.adapter.aliases


def test_cross_namespace_clash_serves_the_newcomer_under_its_qualified_name() -> None:
    older, newer = lora("sql", "a"), lora("sql", "b", created="2026-03-01T00:00:00Z", aliases=["x"])
    verdicts = {v.namespace: v for v in admit(base(adapterNamespaces=SELECTOR), [newer, older], LABELS)}
    assert (verdicts["a"].reason, verdicts["b"].reason) == ("Accepted", "NameConflict")
    assert verdicts["b"].accepted and "LoraAdapter a/sql" in verdicts["b"].message
    assert sorted(desired_set(verdicts.values())) == ["b/sql", "sql"]
    assert verdicts["b"].adapter.aliases == ("x",)
    # an adapter named like the base, from another namespace: served, qualified
    (clash,) = admit(base(adapterNamespaces=SELECTOR), [lora("gemma", "a")], LABELS)
    assert clash.accepted and clash.adapter.name == "a/gemma"


def test_key_refs_split_protected_and_open() -> None:
    refs = {"apiKeySecretRefs": [{"name": "team-a", "key": "k"}]}
    adapters = [lora("sql", "a", access=refs), lora("chat", "b"), lora("nobody", "a", access={})]
    verdicts = admit(base(adapterNamespaces=SELECTOR), adapters, LABELS)
    protected, open_names = key_refs(verdicts, adapters)
    assert open_names == ["chat"]
    assert {name: (ns, [r.name for r in items]) for name, (ns, items) in protected.items()} == {
        "sql": ("a", ["team-a"]),
        "nobody": ("a", []),
    }


async def test_access_secret_holds_digests_the_server_accepts() -> None:
    refs = {"apiKeySecretRefs": [{"name": "team-a", "key": "k"}, {"name": "gone", "key": "k"}]}
    adapters = [lora("sql", "a", access=refs), lora("chat", "b")]
    bmd = base(adapterNamespaces=SELECTOR)
    verdicts = admit(bmd, adapters, LABELS)
    kube = FakeSecrets({("a", "team-a", "k"): "key-of-team-a\n"})
    secret = await render_access_secret(kube, bmd, verdicts, adapters, SALT)  # type: ignore[arg-type]
    assert secret["metadata"]["name"] == "gemma-access" and secret["kind"] == "Secret"
    assert secret["metadata"]["ownerReferences"][0]["uid"] == "u"
    assert ("a", "team-a", "k") in kube.reads and all(read[0] == "a" for read in kube.reads)
    text = base64.b64decode(secret["data"]["keys.json"]).decode()
    assert "key-of-team-a" not in text
    assert json.loads(text)["adapters"] == {"sql": [digest_key(SALT, "key-of-team-a")]}
    # the contract: the server's reader opens `sql` with the key, nothing else with it
    access = AccessControl("deployment", AccessTable.from_json(text))
    caller = access.identify("Bearer key-of-team-a")
    assert access.may_use(caller, "sql") and not access.may_use(caller, "chat")
    assert access.may_use(access.identify("Bearer deployment"), "chat")
    assert not access.may_use(access.identify("Bearer deployment"), "sql")
    assert not access.may_use(access.identify("Bearer deployment"), "not-yet-listed")


def test_a_load_declared_open_is_callable_before_the_file_names_it_and_the_file_wins() -> None:
    text = access_document(SALT, {"sql": ["key-a"]}, open_names=["chat"])
    access = AccessControl("deployment", AccessTable.from_json(text))
    deployment = access.identify("Bearer deployment")
    assert access.access_of("poem") == "pending" and not access.may_use(deployment, "poem")
    access.declare_open("poem", True)  # the operator's load said: no keys, open
    assert access.access_of("poem") == "open" and access.may_use(deployment, "poem")
    access.declare_open("sql", True)  # a declaration never opens what the file protects
    assert access.access_of("sql") == "protected" and not access.may_use(deployment, "sql")
    access.declare_open("poem", False)  # unloaded (or reloaded without `open`): closed again
    assert access.access_of("poem") == "pending"
    closed = AccessControl("deployment", AccessTable(loaded=False))
    closed.declare_open("poem", True)  # before the file could be read once: fail closed
    assert closed.is_protected("poem")


def test_document_is_stable_and_keeps_its_salt() -> None:
    first = access_document(SALT, {"sql": ["k2", "k1"]}, ["chat", "chat"])
    assert first == access_document(SALT, {"sql": ["k1", "k2"]}, ["chat"])
    assert salt_of(first) == SALT and salt_of(None) is None and salt_of("{}") is None
    assert access_document(bytes(16), {"sql": ["k1"]}, []) != access_document(SALT, {"sql": ["k1"]}, [])


async def test_read_salt_reuses_the_existing_secret_else_makes_one() -> None:
    bmd = base()
    existing = FakeSecrets({("llm", "gemma-access", "keys.json"): access_document(SALT, {}, [])})
    assert await read_salt(existing, bmd) == SALT  # type: ignore[arg-type]
    fresh = [await read_salt(FakeSecrets({}), bmd) for _ in range(2)]  # type: ignore[arg-type]
    assert len(fresh[0]) == 16 and fresh[0] != fresh[1]


def test_pods_mount_the_access_secret() -> None:
    deployment = build_deployment(base(), RenderOptions())
    pod = deployment["spec"]["template"]["spec"]
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    assert volumes["access"]["secret"]["secretName"] == "gemma-access"
    container = pod["containers"][0]
    mounts = {mount["name"]: mount for mount in container["volumeMounts"]}
    assert mounts["access"] == {"name": "access", "mountPath": "/etc/loraplex/access", "readOnly": True}
    env = {item["name"]: item.get("value") for item in container["env"]}
    assert env["ADAPTER_KEYS_FILE"] == "/etc/loraplex/access/keys.json"


def test_status_tokens_sum_the_pods_reports() -> None:
    sql = DesiredAdapter(name="sql", source="hf://org/sql")

    def pod(name: str, prompt: int, generated: int) -> PodObservation:
        report = AdapterReport(
            name="sql", source=sql.source, state="ready", prompt_tokens=prompt, generated_tokens=generated
        )
        return PodObservation(name=name, ip="10.0.0.2", running=True, ready=True, epoch="0@t").with_reports(
            [report]
        )

    status = lora_status(sql, 1, [pod("p1", 10, 4), pod("p2", 5, 1)], {}, LoraAdapterStatus(), 0.0)
    assert status.tokens == TokenUsage(prompt=15, generated=5)
    silent = PodObservation(name="p1", ip="10.0.0.2", running=True, ready=True, epoch="0@t").with_error(
        "down"
    )
    kept = lora_status(sql, 1, [silent], {}, status, 0.0)
    assert kept.tokens == TokenUsage(prompt=15, generated=5)


async def test_access_keys_condition_names_what_is_missing_never_values() -> None:
    refs = {"apiKeySecretRefs": [{"name": "team-a", "key": "k"}, {"name": "gone", "key": "k"}]}
    adapters = [lora("sql", "a", access=refs), lora("chat", "b"), lora("nobody", "a", access={})]
    bmd = base(adapterNamespaces=SELECTOR)
    verdicts = admit(bmd, adapters, LABELS)
    kube = FakeSecrets({("a", "team-a", "k"): "key-of-team-a"})
    _, conditions = await render_access(kube, bmd, verdicts, adapters, SALT)  # type: ignore[arg-type]
    assert set(conditions) == {"sql", "nobody"}
    assert (conditions["sql"].status.value, conditions["sql"].reason) == ("False", "SecretNotFound")
    assert "gone[k]" in conditions["sql"].message and "key-of-team-a" not in conditions["sql"].message
    assert conditions["nobody"].reason == "NoKeys"
    kube.secrets[("a", "gone", "k")] = "second-key"
    _, conditions = await render_access(kube, bmd, verdicts, adapters, SALT)  # type: ignore[arg-type]
    assert (conditions["sql"].status.value, conditions["sql"].reason) == ("True", "KeysFound")
