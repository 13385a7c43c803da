"""decide(observed) -> Plan, table-driven: every phase and condition, restarts, partial readiness,
refusals, name clashes, access pending, finalizers, gates, spec checks. Pure: milliseconds."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from loraplex.operator import decide as decide_module
from loraplex.operator.admission import ATTACHED_ANNOTATION
from loraplex.operator.children import INFERENCE_POOL, KEDA, KEDA_MISSING, Capabilities
from loraplex.operator.conditions import condition
from loraplex.operator.decide import FINALIZER, decide
from loraplex.operator.desired import DesiredAdapter
from loraplex.operator.engine_client import AdapterReport
from loraplex.operator.memo import DecideCache
from loraplex.operator.observe import Observed
from loraplex.operator.pods import PodObservation
from loraplex.operator.reconcile import Load, Unload, record_failure

NOW = 1_800_000_000.0
EPOCH = "0@2026-12-01T00:00:00Z"


def bmd_body(replicas: int = 2, **spec: Any) -> dict[str, Any]:
    meta = {"name": "gemma", "namespace": "llm", "uid": "u", "generation": 3, "resourceVersion": "1"}
    return {"metadata": meta, "spec": {"model": {"id": "m"}, "replicas": replicas, **spec}}


def lora(name: str, namespace: str = "llm", created: str = "2026-01-01T00:00:00Z", **spec: Any) -> dict:
    meta = {"name": name, "namespace": namespace, "creationTimestamp": created, "generation": 1}
    meta["finalizers"] = [FINALIZER]
    meta["annotations"] = {ATTACHED_ANNOTATION: "llm/gemma"}
    body_spec = {"baseModel": {"name": "gemma", "namespace": "llm"}, "source": {"uri": f"hf://o/{name}"}}
    return {"metadata": meta, "spec": {**body_spec, **spec}}


def report(name: str, state: str = "ready", namespace: str = "llm", **fields: Any) -> AdapterReport:
    values = {"name": name, "source": f"hf://o/{name}", "state": state, "aliases": (f"{namespace}/{name}",)}
    return AdapterReport(**{**values, **fields})


def pod(name: str, *reports: AdapterReport, ready: bool = True, **fields: Any) -> PodObservation:
    observed = PodObservation(
        name=name, ip="10.0.0.2", port=8080, running=True, ready=ready, epoch=EPOCH, **fields
    )
    return observed.with_reports(list(reports))


def observe(*pods: PodObservation, adapters: list[dict] | None = None, **fields: Any) -> Observed:
    values = {
        "bmd_body": bmd_body(),
        "adapters": [lora("sql")] if adapters is None else adapters,
        "namespace_labels": {},
        "pods": list(pods),
        "salt": b"s" * 16,
        "now": NOW,
        **fields,
    }
    return Observed(**values)


def lora_status(plan, name: str = "sql") -> dict[str, Any]:
    return next(patch.status for patch in plan.lora_statuses if patch.name == name)


def conditions(status: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {item["type"]: (item["status"], item["reason"]) for item in status.get("conditions", [])}


UNSERVING = pod("b", report("sql"), ready=False)
LOADING = pod("b", report("sql", state="loading"))
FAILED = pod("b", report("sql", state="failed", error="bad rank", error_type="rank_exceeds_max"))
STARTING = PodObservation(name="a")  # scheduled, not running: nothing to load on it yet

# (case, pods, adapter phase, ready replicas, adapter conditions that must hold)
PHASES = [
    ("no pods", [], "Pending", 0, {"Ready": ("False", "NoPods")}),
    ("pod not started", [PodObservation(name="a")], "Pending", 0, {"Loaded": ("False", "Pending")}),
    ("loading", [LOADING], "Loading", 0, {"Ready": ("False", "Loading")}),
    ("ready everywhere", [pod("a", report("sql")), pod("b", report("sql"))], "Ready", 2, {}),
    ("partially", [pod("a", report("sql")), LOADING], "PartiallyReady", 1, {"Loaded": ("True", "Loaded")}),
    ("held, pod unready", [pod("a", report("sql")), UNSERVING], "PartiallyReady", 1, {}),
    ("only on unready pods", [UNSERVING], "Pending", 0, {"Ready": ("False", "NoPods")}),
    ("failed", [FAILED], "Failed", 0, {"RankExceedsBase": ("True", "RankExceedsMax")}),
    ("failed and ready", [pod("a", report("sql")), FAILED], "PartiallyReady", 1, {}),
]


@pytest.mark.parametrize(("case", "pods", "phase", "ready", "wanted"), PHASES, ids=[p[0] for p in PHASES])
def test_adapter_phase(case: str, pods: list, phase: str, ready: int, wanted: dict) -> None:
    failure = record_failure(None, EPOCH, decide(observe(pod("b"))).actions["b"][0].adapter, "bad rank", NOW)
    status = lora_status(decide(observe(*pods, attempts={("b", "sql"): failure})))  # no retry yet
    assert (status["phase"], status.get("readyReplicas", 0)) == (phase, ready)
    assert conditions(status)["Accepted"] == ("True", "Accepted")
    assert wanted.items() <= conditions(status).items()


def test_counts_of_base_and_adapter_never_contradict() -> None:
    plan = decide(observe(pod("a", report("sql")), UNSERVING))
    base, adapter = plan.bmd_status.status, lora_status(plan)
    assert base["readyReplicas"] == adapter["readyReplicas"] == 1
    assert base["adapters"] == {"desired": 1, "ready": 0, "failed": 0}  # ready = on every pod


# (case, pods, base phase, conditions that must hold)
BASE_PHASES = [
    ("no pods", [], "Pending", {"Available": ("False", "NoReadyPods")}),
    ("scheduled, not running", [PodObservation(name="a")], "Provisioning", {}),
    ("running, not ready", [pod("a", ready=False)], "Loading", {"Ready": ("False", "Loading")}),
    ("one of two", [pod("a"), pod("b", ready=False)], "Degraded", {"Available": ("True", "PodsReady")}),
    (
        "all",
        [pod("a", report("sql")), pod("b", report("sql"))],
        "Ready",
        {"Progressing": ("False", "Converged")},
    ),
    ("stuck", [PodObservation(name="a", stuck="CrashLoopBackOff: boom")], "Failed", {}),
    (
        "unschedulable",
        [PodObservation(name="a", unschedulable="0/3 nodes have a GPU")],
        "Provisioning",
        {"GPUCapacityPending": ("True", "Unschedulable")},
    ),
]


@pytest.mark.parametrize(("case", "pods", "phase", "wanted"), BASE_PHASES, ids=[p[0] for p in BASE_PHASES])
def test_base_phase(case: str, pods: list, phase: str, wanted: dict) -> None:
    status = decide(observe(*pods)).bmd_status.status
    assert status["phase"] == phase
    assert wanted.items() <= conditions(status).items()


def test_loads_what_is_missing_and_unloads_what_is_not_wanted() -> None:
    plan = decide(observe(pod("a", report("old")), pod("b", report("sql"))))
    assert [type(a).__name__ for a in plan.actions["a"]] == ["Unload", "Load"]
    assert plan.actions["a"][0] == Unload("old") and plan.actions["a"][1].adapter.name == "sql"
    assert "b" not in plan.actions  # converged pods get nothing


def test_engine_calls_in_flight_are_not_repeated() -> None:
    plan = decide(observe(pod("a"), busy={("a", "sql"): NOW - 60}))
    assert plan.actions == {}
    assert lora_status(plan)["phase"] == "Pending"  # a slow load: its status is written


def test_a_fresh_load_writes_no_status_until_it_answers() -> None:
    plan = decide(observe(pod("a"), busy={("a", "sql"): NOW - 0.5}))
    assert plan.lora_statuses == ()  # one write when it is Ready, not Loading then Ready
    assert plan.recheck_s == pytest.approx(decide_module.LOAD_GRACE_S - 0.5)


def test_backoff_then_retry_and_a_restart_retries_at_once() -> None:
    adapter = decide(observe(pod("a"))).actions["a"][0].adapter
    failure = record_failure(None, EPOCH, adapter, "rank 128 > 64", NOW, "rank_exceeds_max")
    backing_off = observe(pod("a"), attempts={("a", "sql"): failure})
    plan = decide(backing_off)
    assert plan.actions == {}
    status = lora_status(plan)
    assert status["phase"] == "Failed" and status["instances"][0]["attempts"] == 1
    assert conditions(status)["RankExceedsBase"] == ("True", "RankExceedsMax")
    assert decide(replace(backing_off, now=failure.next_attempt_at)).actions["a"] == [Load(adapter)]
    restarted = observe(replace(pod("a"), epoch="1@later"), attempts={("a", "sql"): failure})
    assert decide(restarted).actions["a"] == [Load(adapter)]  # a new process: no waiting


def test_stale_version_is_replaced_on_one_pod_at_a_time() -> None:
    old = report("sql", source="hf://o/sql-v1")
    plan = decide(observe(pod("a", old), pod("b", old)))
    assert sum(bool(plan.actions.get(name)) for name in ("a", "b")) == 1
    assert lora_status(plan)["readyReplicas"] == 0  # an old version is not the wanted one


@pytest.mark.parametrize(
    ("adapters", "labels", "name", "phase", "accepted"),
    [
        ([lora("sql", namespace="team-a")], {}, "sql", "Pending", ("False", "NotAllowed")),
        ([lora("sql", source={"uri": ""})], {}, "sql", "Failed", ("False", "InvalidSpec")),
        (
            [lora("sql", baseModel={"name": "other"})],
            {},
            "sql",
            "Failed",
            ("False", "BaseModelImmutable"),
        ),
        (
            [lora("sql"), lora("sql-2", created="2026-02-01T00:00:00Z", servedName="sql")],
            {},
            "sql-2",
            "Failed",
            ("False", "NameConflict"),
        ),
    ],
    ids=["namespace not admitted", "invalid spec", "base changed", "name clash in own namespace"],
)
def test_refusals(adapters: list, labels: dict, name: str, phase: str, accepted: tuple) -> None:
    plan = decide(observe(pod("a"), adapters=adapters, namespace_labels=labels))
    status = lora_status(plan, name)
    assert (status["phase"], conditions(status)["Accepted"]) == (phase, accepted)
    assert all(
        action.adapter.name != name for action in plan.actions.get("a", []) if isinstance(action, Load)
    )


def test_cross_namespace_clash_serves_the_newcomer_under_its_qualified_name() -> None:
    base = bmd_body(adapterNamespaces={"from": "All"})
    adapters = [lora("sql"), lora("sql", namespace="team-a", created="2026-02-01T00:00:00Z")]
    plan = decide(observe(pod("a"), adapters=adapters, bmd_body=base))
    loads = {action.adapter.name for action in plan.actions["a"]}
    assert loads == {"sql", "team-a/sql"}
    written = decide(observe(STARTING, adapters=adapters, bmd_body=base))
    clashing = next(p.status for p in written.lora_statuses if p.namespace == "team-a")
    assert conditions(clashing)["Accepted"] == ("True", "NameConflict")


def test_access_pending_is_not_ready_and_looks_again_soon() -> None:
    plan = decide(observe(pod("a", report("sql", state="loading", access="pending"))))
    assert lora_status(plan)["phase"] == "Loading"
    assert plan.recheck_s == decide_module.RECHECK_S
    assert decide(observe(pod("a", report("sql")))).recheck_s is None


def test_access_keys_condition_and_secret() -> None:
    refs = {"apiKeySecretRefs": [{"name": "keys", "key": "k"}]}
    adapters = [lora("sql", access=refs)]
    missing = decide(observe(STARTING, adapters=adapters))
    assert conditions(lora_status(missing))["AccessKeys"] == ("False", "SecretNotFound")
    found = decide(observe(STARTING, adapters=adapters, secrets={("llm", "keys", "k"): "key-1"}))
    assert conditions(lora_status(found))["AccessKeys"] == ("True", "KeysFound")
    names = [(child["kind"], child["metadata"]["name"]) for child in found.children]
    assert names[:3] == [  # the keys and adapters before the pods that read them
        ("Secret", "gemma-access"),
        ("Secret", "gemma-credentials"),
        ("ConfigMap", "gemma-adapters"),
    ]
    assert found.children[0] != missing.children[0]  # the digest of key-1 is in the file now


def test_credentials_secret_holds_only_the_source_keys_observed() -> None:
    source = {"uri": "s3://models/sql", "credentialsSecretRef": {"name": "aws"}}
    adapters = [lora("sql", source=source)]
    secrets = {("llm", "aws", "AWS_ACCESS_KEY_ID"): "AKIA1", ("llm", "aws", "AWS_SECRET_ACCESS_KEY"): "s3"}
    plan = decide(observe(STARTING, adapters=adapters, secrets=secrets))
    (credentials,) = [c for c in plan.children if c["metadata"]["name"].endswith("-credentials")]
    assert sorted(credentials["data"]) == ["sql.AWS_ACCESS_KEY_ID", "sql.AWS_SECRET_ACCESS_KEY"]


# (case, adapter body changes, pods, wanted finalizers or None for no patch)
FINALIZERS = [
    ("admitted Unload keeps ours", {}, [pod("a")], None),
    ("new adapter gets ours", {"finalizers": []}, [pod("a")], (FINALIZER,)),
    ("Orphan never holds", {"finalizers": ["loraplex.dev/finalizer"]}, [pod("a")], ()),
    ("deleting, still loaded", {"deletionTimestamp": "t"}, [pod("a", report("sql"))], None),
    ("deleting, unloaded", {"deletionTimestamp": "t"}, [pod("a")], ()),
    ("deleting, pod unreachable", {"deletionTimestamp": "t"}, [pod("a").with_error("refused")], ()),
    ("deleting, another source", {"deletionTimestamp": "t"}, [pod("a", report("sql", source="x"))], ()),
]


@pytest.mark.parametrize(("case", "meta", "pods", "wanted"), FINALIZERS, ids=[f[0] for f in FINALIZERS])
def test_finalizers(case: str, meta: dict, pods: list, wanted: tuple | None) -> None:
    body = lora("sql", **({"deletionPolicy": "Orphan"} if "Orphan" in case else {}))
    body["metadata"].update(meta)
    plan = decide(observe(*pods, adapters=[body]))
    patches = [patch.finalizers for patch in plan.meta]
    assert patches == ([] if wanted is None else [wanted])
    if "deleting" in case:
        assert not plan.lora_statuses  # going away: no status write
    if case in ("deleting, still loaded", "deleting, unloaded"):
        unloads = [a for a in plan.actions.get("a", []) if isinstance(a, Unload)]
        assert bool(unloads) == (wanted is None)


def test_first_acceptance_records_the_attachment() -> None:
    body = lora("sql")
    del body["metadata"]["annotations"]
    (patch,) = decide(observe(pod("a"), adapters=[body])).meta
    assert patch.annotations == {ATTACHED_ANNOTATION: "llm/gemma"} and patch.finalizers == (FINALIZER,)


@pytest.mark.parametrize(
    ("reports", "current", "wanted"),
    [
        ((), None, {"status": "False", "reason": "AdaptersLoading", "message": f"engine epoch {EPOCH}"}),
        (
            (report("sql"),),
            None,
            {"status": "True", "reason": "AdaptersLoaded", "message": f"engine epoch {EPOCH}"},
        ),
        (
            (report("sql", state="failed"),),
            None,
            {"status": "True", "reason": "AdaptersLoaded", "message": f"engine epoch {EPOCH}"},
        ),
        ((), {"status": "True", "message": f"engine epoch {EPOCH}"}, None),  # open stays open
    ],
    ids=["loading closes", "loaded opens", "failed never holds a pod out", "open in this epoch"],
)
def test_readiness_gate(reports: tuple, current: dict | None, wanted: dict | None) -> None:
    plan = decide(observe(pod("a", *reports, ready=False), pod_gates={"a": current}))
    assert [gate.condition for gate in plan.gates] == ([] if wanted is None else [wanted])


def test_no_gate_when_the_spec_turns_it_off() -> None:
    assert decide(observe(pod("a"), bmd_body=bmd_body(readinessGate=False))).gates == ()


def test_unchanged_status_is_not_written() -> None:
    first = decide(observe(pod("a", report("sql")), pod("b", report("sql"))))
    stored = lora("sql")
    stored["status"] = lora_status(first)
    base = bmd_body()
    base["status"] = first.bmd_status.status
    again = decide(
        observe(pod("a", report("sql")), pod("b", report("sql")), adapters=[stored], bmd_body=base)
    )
    assert again.bmd_status is None and again.lora_statuses == ()


def test_invalid_base_spec_decides_nothing() -> None:
    plan = decide(observe(pod("a"), bmd_body=bmd_body(replicas=-1)))
    assert plan.actions == {} and plan.bmd_status is None and "invalid spec" in plan.notes[0]


def test_spec_checks_plug_in_and_fail_the_base(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_more_than_one(bmd):
        return (
            condition("Refused", False, "TooManyReplicas", "at most 1", bmd.generation)
            if bmd.spec.replicas > 1
            else None
        )

    monkeypatch.setattr(decide_module, "SPEC_CHECKS", [no_more_than_one])
    status = decide(observe(pod("a"))).bmd_status.status
    assert status["phase"] == "Failed" and conditions(status)["Refused"] == ("False", "TooManyReplicas")


def test_restored_attempts_come_from_status() -> None:
    adapter = DesiredAdapter(name="sql", source="hf://o/sql", aliases=("llm/sql",), open=True)
    failure = record_failure(None, EPOCH, adapter, "boom", NOW, "source")
    stored = lora("sql")
    stored["status"] = lora_status(decide(observe(pod("a"), attempts={("a", "sql"): failure})))
    restored = decide_module.restore_attempts(observe(pod("a"), adapters=[stored]))
    assert restored[("a", "sql")].attempts == 1 and restored[("a", "sql")].epoch == EPOCH


def test_finalizer_patch_tests_the_finalizers_not_the_resource_version() -> None:
    body = lora("sql")
    body["metadata"]["finalizers"] = ["example.com/other"]
    del body["metadata"]["annotations"]
    (patch,) = decide(observe(pod("a"), adapters=[body])).meta
    assert patch.json_patch() == [
        {"op": "test", "path": "/metadata/finalizers", "value": ["example.com/other"]},
        {"op": "replace", "path": "/metadata/finalizers", "value": ["example.com/other", FINALIZER]},
        {"op": "add", "path": "/metadata/annotations", "value": {ATTACHED_ANNOTATION: "llm/gemma"}},
    ]
    fresh = lora("sql")
    del fresh["metadata"]["finalizers"]
    fresh["metadata"]["annotations"] = {"a": "b"}
    (patch,) = decide(observe(pod("a"), adapters=[fresh])).meta
    assert patch.json_patch() == [
        {"op": "add", "path": "/metadata/finalizers", "value": [FINALIZER]},
        {"op": "add", "path": "/metadata/annotations/loraplex.dev~1attached-to", "value": "llm/gemma"},
    ]


POOL_ON = {"routing": {"inferencePool": {"enabled": True, "endpointPickerRef": {"name": "epp"}}}}
HPA_ON = {"autoscaling": {"maxReplicas": 4}}
KEDA_ON = {"autoscaling": {"maxReplicas": 4, "provider": "KEDA", "serverAddress": "http://prom:9090"}}
CHILD_CASES = [  # (case, spec, optional kinds served, applied kinds after the ConfigMap, deleted, note)
    ("plain", {}, set(), ["Deployment", "Service", "PodDisruptionBudget"], ["HorizontalPodAutoscaler"], None),
    ("pool asked", POOL_ON, set(), ["Deployment", "Service", "PodDisruptionBudget", "InferencePool"],
     ["HorizontalPodAutoscaler"], None),
    ("pool served, not asked", {}, {INFERENCE_POOL}, ["Deployment", "Service", "PodDisruptionBudget"],
     ["InferencePool", "HorizontalPodAutoscaler"], None),
    ("hpa", HPA_ON, set(), ["Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler"],
     [], None),
    ("keda served", KEDA_ON, {KEDA}, ["Deployment", "Service", "PodDisruptionBudget", "ScaledObject"],
     ["HorizontalPodAutoscaler"], None),
    ("keda missing", KEDA_ON, set(), ["Deployment", "Service", "PodDisruptionBudget"],
     ["HorizontalPodAutoscaler"], KEDA_MISSING),
    ("autopilot refuses the pods", {"scheduling": {"autopilot": True, "nodeSelector": {"team": "a"}}},
     set(), None, None, None),
]  # fmt: skip


@pytest.mark.parametrize(("case", "spec", "served", "applied", "deleted", "note"), CHILD_CASES)
def test_children_in_the_plan(case, spec, served, applied, deleted, note) -> None:
    caps = Capabilities(hpa_api_version="autoscaling/v2beta2", served=frozenset(served))
    plan = decide(_with_spec(spec, caps))
    kinds = [child["kind"] for child in plan.children[3:]]
    if applied is None:
        assert "Deployment" not in kinds, case
        return
    assert kinds == applied, case
    assert [kind for _, kind in plan.deletes] == deleted, case
    assert (plan.base, plan.namespace) == ("gemma", "llm")
    assert (note in plan.notes) if note else not any("KEDA" in line for line in plan.notes)


def _with_spec(spec: dict[str, Any], caps: Capabilities) -> Any:
    body = bmd_body()
    body["spec"].update(spec)
    return observe(bmd_body=body, capabilities=caps)


def test_the_cache_changes_nothing_and_recomputes_only_what_changed() -> None:
    """decide(observed, cache) == decide(observed); a pass whose inputs did not move is all hits,
    and one pod's new report of one adapter recomputes that adapter only."""
    adapters = [lora(f"a{i}") for i in range(5)]
    first = observe(pod("a", *(report(f"a{i}") for i in range(4))), pod("b"), adapters=adapters)
    cache = DecideCache()
    assert decide(first, cache) == decide(first)
    assert (cache.hits, cache.misses) == (0, 5)
    assert decide(first, cache) == decide(first)
    assert cache.hits == 5
    later = replace(first, pods=[first.pods[0], pod("b", report("a2"))], now=NOW + 5)
    assert decide(later, cache) == decide(later)
    assert (cache.hits, cache.misses) == (9, 6)
    restored = replace(later, adapters=adapters[:2])  # three deleted: their entries go
    decide(restored, cache)
    assert set(cache.statuses) == {("llm", "a0"), ("llm", "a1")}


def test_the_cache_misses_when_the_stored_status_is_another_object() -> None:
    adapters = [lora("sql")]
    cache = DecideCache()
    decide(observe(pod("a", report("sql")), adapters=adapters), cache)
    written = [{**adapters[0], "status": {"phase": "Ready"}}]
    plan = decide(observe(pod("a", report("sql")), adapters=written), cache)
    assert cache.misses == 2
    assert plan == decide(observe(pod("a", report("sql")), adapters=written))
