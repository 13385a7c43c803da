"""The Helm chart: lints, renders each scope right, and stays in step with crds/, the package
version, the operator's flags and the plain manifests generated from it."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest
import yaml
from chart_tools import CHART, CRDS, MANIFESTS, ROOT, documents, find, helm, render

from loraplex.operator.main import add_arguments
from loraplex.version import __version__

VALUE_SETS = {
    "defaults": [],
    "namespace scope": ["scope=namespace", "watchNamespaces={llm,team-a}"],
    "samples and team role": [
        "samples.enabled=true",
        "adapterEditorRole.create=true",
        "adapterEditorRole.bindings[0].namespace=team-a",
        "adapterEditorRole.bindings[0].subjects[0].kind=Group",
        "adapterEditorRole.bindings[0].subjects[0].name=team-a",
    ],
    "no operator, debug": ["operator.enabled=false", "operator.logLevel=debug"],
}


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_chart_lints(values: list[str]) -> None:
    sets = [arg for value in values for arg in ("--set", value)]
    result = helm("lint", "--strict", str(CHART), *sets)
    assert "0 chart(s) failed" in result.stdout


def test_chart_crds_are_the_generated_ones() -> None:
    chart_crds = {path.name: path.read_text() for path in (CHART / "crds").glob("*.yaml")}
    assert chart_crds == {path.name: path.read_text() for path in CRDS.glob("*.yaml")}


def test_generated_manifests_are_current() -> None:
    """install.yaml, rbac/ and the chart's crds/ equal what `python manifests/generate.py` writes."""
    result = subprocess.run(
        [sys.executable, str(MANIFESTS / "generate.py"), "--check"], capture_output=True, text=True, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr


def test_chart_version_follows_the_package() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["appVersion"] == __version__.split("+")[0]
    assert chart["version"] == chart["appVersion"]


def _operator_container(docs: list[dict]) -> dict:
    (deployment,) = find(docs, "Deployment", "loraplex-operator")
    return deployment["spec"]["template"]["spec"]["containers"][0]


def _parse_operator_args(args: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_arguments(parser)
    return parser.parse_args(args)


def test_cluster_scope_watches_everything_with_one_cluster_role() -> None:
    docs = render()
    (deployment,) = find(docs, "Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    container = _operator_container(docs)
    args = _parse_operator_args(container["args"])
    assert args.all_namespaces and not args.namespace and not args.verbose
    assert container["image"] == f"ghcr.io/loraplex/operator:{__version__.split('+')[0]}"
    env = {item["name"]: item["value"] for item in container["env"]}
    assert env["LORAPLEX_SERVER_IMAGE"] == f"ghcr.io/loraplex/server:{__version__.split('+')[0]}"
    assert not find(docs, "Role") and not find(docs, "RoleBinding")
    (binding,) = find(docs, "ClusterRoleBinding")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "loraplex-operator", "namespace": "loraplex-system"}
    ]


def test_liveness_probe_hits_the_endpoint_the_operator_serves() -> None:
    container = _operator_container(render())
    liveness = _parse_operator_args(container["args"]).liveness
    probe = container["livenessProbe"]["httpGet"]
    port = {p["name"]: p["containerPort"] for p in container["ports"]}[probe["port"]]
    assert liveness == f"http://0.0.0.0:{port}{probe['path']}"


def test_namespace_scope_grants_the_same_rights_split_by_namespace() -> None:
    docs = render("scope=namespace", "watchNamespaces={llm,team-a}", namespace="ops")
    args = _parse_operator_args(_operator_container(docs)["args"])
    assert args.namespace == ["llm", "team-a"] and not args.all_namespaces
    roles = find(docs, "Role")
    assert sorted(role["metadata"]["namespace"] for role in roles) == ["llm", "team-a"]
    assert sorted(b["metadata"]["namespace"] for b in find(docs, "RoleBinding")) == ["llm", "team-a"]
    (cluster_role,) = find(docs, "ClusterRole")
    assert cluster_role["metadata"]["name"] == "loraplex-operator-ops"
    (cluster_wide,) = find(render(), "ClusterRole", "loraplex-operator")
    assert roles[0]["rules"] + cluster_role["rules"] == cluster_wide["rules"]
    assert {r for rule in cluster_role["rules"] for r in rule["resources"]} == {
        "namespaces",
        "customresourcedefinitions",
    }


def test_namespace_scope_defaults_to_the_release_namespace() -> None:
    docs = render("scope=namespace", namespace="llm")
    assert _parse_operator_args(_operator_container(docs)["args"]).namespace == ["llm"]
    assert [role["metadata"]["namespace"] for role in find(docs, "Role")] == ["llm"]


def test_operator_can_be_left_out_and_debug_logs() -> None:
    assert not find(render("operator.enabled=false"), "Deployment")
    assert find(render("operator.enabled=false"), "ClusterRole", "loraplex-operator")
    args = _parse_operator_args(_operator_container(render("operator.logLevel=debug"))["args"])
    assert args.verbose


@pytest.mark.parametrize("bad", ["operator.replicas=2", "scope=everywhere", "operator.logLevel=trace"])
def test_values_schema_refuses(bad: str) -> None:
    result = helm("template", "loraplex", str(CHART), "--set", bad, check=False)
    assert result.returncode != 0


def test_samples_are_off_by_default_and_match_manifests_samples() -> None:
    assert not find(render(), "BaseModelDeployment")
    docs = render("samples.enabled=true", namespace="demo")
    rendered = {
        (d["kind"], d["metadata"]["name"]): d["spec"] for d in docs if d["apiVersion"].startswith("loraplex")
    }
    shipped = {
        (d["kind"], d["metadata"]["name"]): d["spec"]
        for path in sorted((MANIFESTS / "samples").glob("*.yaml"))
        for d in documents(path)
    }
    assert rendered == shipped
    assert {d["metadata"]["namespace"] for d in docs if d["apiVersion"].startswith("loraplex")} == {"demo"}


def test_team_role_and_bindings() -> None:
    assert not find(render(), "ClusterRole", "loraplex-adapter-editor")
    docs = render(*VALUE_SETS["samples and team role"])
    (binding,) = find(docs, "RoleBinding", "loraplex-adapter-editor")
    assert binding["metadata"]["namespace"] == "team-a"
    assert binding["roleRef"]["name"] == "loraplex-adapter-editor"
    assert binding["subjects"] == [{"kind": "Group", "name": "team-a"}]


def test_uninstall_hook_stops_the_operator_then_releases_the_finalizers() -> None:
    assert not find(render(), "Job")  # a hook: never part of what gets installed (nor install.yaml)
    docs = render(hooks=True)
    (job,) = find(docs, "Job", "loraplex-operator-uninstall")
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "pre-delete"
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["loraplex", "operator"]
    args = _parse_operator_args(container["args"])
    assert (args.action, args.all_namespaces) == ("release", True)
    assert args.operator_deployment == "loraplex-system/loraplex-operator"
    (role,) = find(docs, "Role", "loraplex-operator-uninstall")
    scale = next(rule for rule in role["rules"] if rule["resources"] == ["deployments/scale"])
    assert scale["resourceNames"] == ["loraplex-operator"] and scale["verbs"] == ["patch"]
    scoped = _parse_operator_args(
        find(render("scope=namespace", "watchNamespaces={llm}", hooks=True), "Job")[0]["spec"]["template"][
            "spec"
        ]["containers"][0]["args"]
    )
    assert scoped.namespace == ["llm"]
    assert not find(render("uninstallHook.enabled=false", hooks=True), "Job")
