"""The emulator answers as a real API server does where the operator once went wrong: canonical
quantities and dropped empty fields on read, 500 "field not declared in schema" for server-side
apply, and managedFields that ``kubectl get -o json`` shows only with --show-managed-fields."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from .conftest import DEPLOYMENTS, NS, Cluster
from .emulator import builtin_schema, canonical_quantity

# ParseQuantity(in).String() == out, from apimachinery's quantity_test.go (TestQuantityString's
# alternates, TestQuantityParseEmit, the rounding and saturating cases) and what issue 14 saw.
CANONICAL = [
    ("0.5", "500m"), ("1024Mi", "1Gi"), ("1.5", "1500m"), ("1.5Gi", "1536Mi"),
    ("307200Ki", "300Mi"), ("1025024Mi", "1001Gi"), ("1024Gi", "1Ti"), ("5000m", "5"),
    ("1000M", "1G"), ("0.001T", "1G"), ("1000u", "1m"), ("1.08", "1080m"),
    ("1080000000n", "1080m"), ("1000E", "1e21"), ("5000E", "5e21"), (".001e12", "1e9"),
    ("0.001e0", "1e-3"), ("1000e-12", "1e-9"), ("00", "0"), ("1Ki", "1Ki"), ("1Gi", "1Gi"),
    (".001Ki", "1024m"), (".000001Ki", "1024u"), (".000000000001Ki", "2n"), ("3.001n", "4n"),
    ("0.9n", "1n"), ("0.00000012345", "124n"), ("9Ei", "9223372036854775807"), ("12E", "12E"),
    ("0.5Ki", "512"), ("1e3", "1e3"), ("1.5e3", "1500"), ("-1.5", "-1500m"), ("1.G", "1G"),
    ("100m", "100m"), ("32Gi", "32Gi"), ("2", "2"), (2, "2"), (0.5, "500m"), ("0Gi", "0"),
]


@pytest.mark.parametrize(("written", "stored"), CANONICAL)
def test_quantities_are_stored_in_canonical_form(written, stored):
    assert canonical_quantity(written) == stored
    assert canonical_quantity(stored) == stored  # canonical is a fixed point


def test_what_is_not_a_quantity_is_left_alone():
    for text in ("", "abc", "1.1.M", "0.1mi", "1i", "1e10000000"):
        assert canonical_quantity(text) == text


def deployment(**container: Any) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "llama", "namespace": NS, "annotations": {}},
        "spec": {
            "selector": {"matchLabels": {"app": "x"}},
            "template": {
                "metadata": {"labels": {"app": "x", "empty": ""}},
                "spec": {
                    "containers": [{"name": "engine", "image": "e:1", **container}],
                    "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory",
                                                              "sizeLimit": "4096Mi"}}],
                    "tolerations": [{"operator": "Exists", "key": ""}],
                },
            },
        },
    }  # fmt: skip


def test_the_schema_walk_normalises_as_a_go_server_encodes():
    obj = deployment(resources={"requests": {"cpu": "0.5", "memory": "1024Mi"}},
                     env=[{"name": "EMPTY", "value": ""}, {"name": "SET", "value": "1"}],
                     args=[])  # fmt: skip
    stored = builtin_schema().normalise(obj)
    assert stored.undeclared == []
    pod = stored.obj["spec"]["template"]["spec"]
    engine = pod["containers"][0]
    assert engine["resources"] == {"requests": {"cpu": "500m", "memory": "1Gi"}}
    assert engine["env"] == [{"name": "EMPTY"}, {"name": "SET", "value": "1"}]
    assert "args" not in engine  # an empty optional list
    assert pod["volumes"][0]["emptyDir"] == {"medium": "Memory", "sizeLimit": "4Gi"}
    assert pod["tolerations"] == [{"operator": "Exists"}]
    # Map values stay as they are, even empty; an empty map is left out; structs stay.
    assert stored.obj["spec"]["template"]["metadata"]["labels"] == {"app": "x", "empty": ""}
    assert "annotations" not in stored.obj["metadata"]
    assert stored.obj["spec"]["selector"] == {"matchLabels": {"app": "x"}}


def test_undeclared_fields_are_named_as_structured_merge_diff_names_them():
    obj = deployment(resources={"limits": {"cpu": "1"}, "cpus": 1})
    obj["spec"]["template"]["spec"]["affinity"] = {"nodeAffinity": {"wrong": True}}
    assert builtin_schema().normalise(obj).undeclared == [
        '.spec.template.spec.containers[name="engine"].resources.cpus',
        ".spec.template.spec.affinity.nodeAffinity.wrong",
    ]


async def raw(cluster: Cluster, method: str, path: str, body: Any,
              content_type: str) -> tuple[int, dict[str, Any]]:  # fmt: skip
    headers = {"Content-Type": content_type}
    params = {"fieldManager": "tester", "force": "true"}
    async with cluster.server.client.request(
        method, path, data=json.dumps(body), headers=headers, params=params
    ) as response:
        return response.status, await response.json()


@pytest.mark.asyncio
async def test_server_side_apply_of_an_undeclared_field_is_a_500_with_smds_words(cluster):
    obj = deployment()
    obj["spec"]["template"]["spec"]["affinity"] = {"nodeAffinity": {"wrong": True}}
    code, body = await raw(cluster, "PATCH", cluster.path(DEPLOYMENTS, "llama"), obj,
                           "application/apply-patch+yaml")  # fmt: skip
    assert code == 500
    assert body == {
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": "failed to create typed patch object (ml/llama; apps/v1, Kind=Deployment): "
                   ".spec.template.spec.affinity.nodeAffinity.wrong: field not declared in "
                   "schema",
        "code": 500,
    }  # fmt: skip
    assert cluster.get(DEPLOYMENTS, "llama") is None  # nothing was stored
    # Two undeclared fields: SMD lists them.
    obj["spec"]["template"]["spec"]["containers"][0]["sidecar"] = True
    code, body = await raw(cluster, "PATCH", cluster.path(DEPLOYMENTS, "llama"), obj,
                           "application/apply-patch+yaml")  # fmt: skip
    assert code == 500 and body["message"].endswith(
        "Kind=Deployment): errors:\n"
        '  .spec.template.spec.containers[name="engine"].sidecar: field not declared in schema\n'
        "  .spec.template.spec.affinity.nodeAffinity.wrong: field not declared in schema"
    )


@pytest.mark.asyncio
async def test_stored_objects_read_back_canonical_and_a_same_meaning_apply_is_a_no_op(cluster):
    obj = deployment(resources={"limits": {"cpu": "0.5", "memory": "1024Mi"}},
                     env=[{"name": "EMPTY", "value": ""}])  # fmt: skip
    path = cluster.path(DEPLOYMENTS, "llama")
    code, created = await raw(cluster, "PATCH", path, obj, "application/apply-patch+yaml")
    assert code == 201
    engine = created["spec"]["template"]["spec"]["containers"][0]
    assert engine["resources"] == {"limits": {"cpu": "500m", "memory": "1Gi"}}
    assert engine["env"] == [{"name": "EMPTY"}]
    read = await cluster.call("GET", path)
    assert read["spec"] == created["spec"]
    # Applying the same configuration again changes nothing: no new resourceVersion.
    code, again = await raw(cluster, "PATCH", path, obj, "application/apply-patch+yaml")
    assert code == 200
    assert again["metadata"]["resourceVersion"] == created["metadata"]["resourceVersion"]


def kubectl(kubeconfig: Path, *args: str) -> dict[str, Any]:
    binary = Path(sys.executable).parent / "kubectl"
    done = subprocess.run([str(binary), "--kubeconfig", str(kubeconfig), *args],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.asyncio
async def test_kubectl_shows_managed_fields_only_when_asked(cluster, tmp_path):
    """The server keeps managedFields; kubectl (1.21+) prints them with --show-managed-fields
    only, which is why tests/e2e asks for them."""
    obj = deployment()
    code, _ = await raw(cluster, "PATCH", cluster.path(DEPLOYMENTS, "llama"), obj,
                        "application/apply-patch+yaml")  # fmt: skip
    assert code == 201
    await raw(cluster, "PATCH", cluster.path(DEPLOYMENTS, "llama", "status"),
              {"status": {"replicas": 1}}, "application/merge-patch+json")  # fmt: skip
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
        "clusters": [{"name": "kmock", "cluster": {"server": str(cluster.server.url)}}],
        "users": [{"name": "kmock", "user": {"token": "test"}}],
        "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "kmock",
                                                   "namespace": NS}}],
    }))  # fmt: skip
    plain = await asyncio.to_thread(kubectl, kubeconfig, "get", "deployments", "llama", "-o",
                                    "json")  # fmt: skip
    assert "managedFields" not in plain["metadata"]
    shown = await asyncio.to_thread(kubectl, kubeconfig, "get", "deployments", "llama", "-o",
                                    "json", "--show-managed-fields")  # fmt: skip
    entries = {(f["manager"], f["operation"], f.get("subresource"))
               for f in shown["metadata"]["managedFields"]}  # fmt: skip
    assert entries == {("tester", "Apply", None), ("tester", "Update", "status")}
