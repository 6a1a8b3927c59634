"""Cluster-scheduler manifests for recurring rounds, checked against the real schemas.

The Kubernetes batch/v1 CronJob schema (v1.30) and the KubeRay RayCronJob CRD (v1.7.0) are vendored
under ``tests/data/schemas/`` (sources and commits in its README). Validation is strict: an
unknown field fails, as it does with ``kubectl apply`` (server-side field validation ``Strict``).
No Ray, MLflow or torch: these run in well under a second.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

from pipeline.recurring.emit import interval_to_cron, ray_cluster_name, render_kubernetes

SCHEMAS = Path(__file__).parent / "data" / "schemas"
EXAMPLES = Path(__file__).resolve().parent.parent / "infra" / "k8s" / "recurring"
EXAMPLE_ARGS = dict(name="recurring", spec_path="workflows/recurring.yaml", cron="0 2 * * *", timezone="UTC")
OBJECT_META = "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"
DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
# Enums the API server checks in Go (k8s pkg/apis/batch/validation, pkg/apis/core/validation) but
# the published OpenAPI only names in descriptions; added here the way additionalProperties is,
# and test_added_enums_are_the_documented_ones ties them to the vendored descriptions.
API_SERVER_ENUMS = {
    ("io.k8s.api.batch.v1.CronJobSpec", "concurrencyPolicy"): ["Allow", "Forbid", "Replace"],
    ("io.k8s.api.core.v1.PodSpec", "restartPolicy"): ["Always", "OnFailure", "Never"],
}


def _closed(schema: object) -> object:
    """Every object schema with ``properties`` also rejects unknown fields (kubectl's strict
    field validation), unless it says it preserves them."""
    if isinstance(schema, dict):
        schema = {k: _closed(v) for k, v in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_closed(v) for v in schema]
    return schema


@pytest.fixture(scope="module")
def k8s_schema() -> dict:
    schema = _closed(json.loads((SCHEMAS / "k8s-v1.30.0-cronjob-batch-v1.json").read_text()))
    for (definition, field), values in API_SERVER_ENUMS.items():
        schema["$defs"][definition]["properties"][field]["enum"] = values
    return schema


@pytest.fixture(scope="module")
def cronjob_validator(k8s_schema) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(k8s_schema)


@pytest.fixture(scope="module")
def raycronjob_validator(k8s_schema) -> jsonschema.Draft202012Validator:
    """The CRD's openAPIV3Schema; its ``metadata`` (just ``type: object`` in a CRD) is checked as
    the API server does, against Kubernetes' ObjectMeta."""
    schema = _closed(json.loads((SCHEMAS / "kuberay-v1.7.0-raycronjob.json").read_text()))
    schema["properties"]["metadata"] = {"$ref": f"#/$defs/{OBJECT_META}"}
    schema["$defs"] = k8s_schema["$defs"]
    return jsonschema.Draft202012Validator(schema)


def _manifests(**kwargs) -> tuple[dict, dict]:
    files = render_kubernetes(**{**EXAMPLE_ARGS, **kwargs})
    return yaml.safe_load(files["cronjob.yaml"]), yaml.safe_load(files["raycronjob.yaml"])


def _errors(validator: jsonschema.Draft202012Validator, manifest: dict) -> list[jsonschema.ValidationError]:
    return sorted(validator.iter_errors(manifest), key=lambda e: list(e.absolute_path))


def _container(cronjob: dict) -> dict:
    (container,) = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    return container


# --- the manifests validate, and the checked-in examples are what the renderer gives ---

def test_rendered_manifests_validate(cronjob_validator, raycronjob_validator):
    for kwargs in ({}, {"namespace": "ml", "tracking_secret": None, "timezone": "Europe/Berlin",
                        "ray_address": "http://prod-head-svc.ml.svc.cluster.local:8265", "cron": "@hourly"}):
        cronjob, raycronjob = _manifests(**kwargs)
        assert _errors(cronjob_validator, cronjob) == []
        assert _errors(raycronjob_validator, raycronjob) == []


def test_checked_in_examples_are_the_rendered_ones(cronjob_validator, raycronjob_validator):
    rendered = render_kubernetes(**EXAMPLE_ARGS)
    assert set(rendered) == {"cronjob.yaml", "raycronjob.yaml"}
    for filename, text in rendered.items():
        assert (EXAMPLES / filename).read_text() == text, f"infra/k8s/recurring/{filename} is stale: render it again"
    assert _errors(cronjob_validator, yaml.safe_load((EXAMPLES / "cronjob.yaml").read_text())) == []
    assert _errors(raycronjob_validator, yaml.safe_load((EXAMPLES / "raycronjob.yaml").read_text())) == []


# --- the validation bites ---

@pytest.mark.parametrize(("edit", "path", "message"), [
    (lambda m: m["spec"].update(concurrencyPolicyy=m["spec"].pop("concurrencyPolicy")),
     ["spec"], "'concurrencyPolicyy' was unexpected"),
    (lambda m: m["spec"].update(startingDeadlineSeconds="soon"),
     ["spec", "startingDeadlineSeconds"], "'soon' is not of type 'integer', 'null'"),
    (lambda m: m["spec"].update(concurrencyPolicy="Forbidden"),
     ["spec", "concurrencyPolicy"], "'Forbidden' is not one of ['Allow', 'Forbid', 'Replace']"),
    (lambda m: m["spec"]["jobTemplate"]["spec"]["template"]["spec"].update(restartPolicy="Sometimes"),
     ["spec", "jobTemplate", "spec", "template", "spec", "restartPolicy"], "'Sometimes' is not one of"),
    (lambda m: m["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0].update(envFrom=[{"secret": {"name": "x"}}]),
     ["spec", "jobTemplate", "spec", "template", "spec", "containers", 0, "envFrom", 0], "'secret' was unexpected"),
    (lambda m: m.update(kind="Cronjob"), ["kind"], "'Cronjob' is not one of ['CronJob']"),
    (lambda m: m["spec"].pop("schedule"), ["spec"], "'schedule' is a required property"),
])
def test_cronjob_schema_rejects(cronjob_validator, edit, path, message):
    cronjob, _ = _manifests()
    edit(cronjob)
    errors = _errors(cronjob_validator, cronjob)
    assert len(errors) == 1, [e.message for e in errors]
    assert list(errors[0].absolute_path) == path
    assert message in errors[0].message


@pytest.mark.parametrize(("edit", "path", "message"), [
    (lambda m: m["spec"].update(concurrencyPolicy="Forbid"),  # KubeRay <= 1.7 has none
     ["spec"], "'concurrencyPolicy' was unexpected"),
    (lambda m: m["spec"]["jobTemplate"].update(entrypointt="x"), ["spec", "jobTemplate"], "'entrypointt' was unexpected"),
    (lambda m: m["spec"].update(suspend="no"), ["spec", "suspend"], "'no' is not of type 'boolean'"),
    (lambda m: m["spec"].update(timeZone=""), ["spec", "timeZone"], "should be non-empty"),
    (lambda m: m["spec"]["jobTemplate"].update(
        deletionStrategy={"deletionRules": [{"policy": "DeleteSelf", "condition": {"jobStatus": "DONE"}}]}),
     ["spec", "jobTemplate", "deletionStrategy", "deletionRules", 0, "condition", "jobStatus"],
     "'DONE' is not one of ['SUCCEEDED', 'FAILED']"),
    (lambda m: m["spec"]["jobTemplate"]["clusterSelector"].update({"ray.io/cluster": 3}),
     ["spec", "jobTemplate", "clusterSelector", "ray.io/cluster"], "3 is not of type 'string'"),
    (lambda m: m["metadata"].update(labelz={}), ["metadata"], "'labelz' was unexpected"),
    (lambda m: m["spec"].pop("jobTemplate"), ["spec"], "'jobTemplate' is a required property"),
])
def test_raycronjob_schema_rejects(raycronjob_validator, edit, path, message):
    _, raycronjob = _manifests()
    edit(raycronjob)
    errors = _errors(raycronjob_validator, raycronjob)
    assert len(errors) == 1, [e.message for e in errors]
    assert list(errors[0].absolute_path) == path
    assert message in errors[0].message


def test_added_enums_are_the_documented_ones():
    """The enums added to the OpenAPI are exactly the values its own descriptions list."""
    defs = json.loads((SCHEMAS / "k8s-v1.30.0-cronjob-batch-v1.json").read_text())["$defs"]
    for (definition, field), values in API_SERVER_ENUMS.items():
        description = defs[definition]["properties"][field]["description"]
        assert all(value in description for value in values), (definition, field, description)


# --- what the manifests say ---

def test_cronjob_runs_one_round_at_a_time_on_the_cluster():
    address = "http://raycluster-head-svc.ml.svc:8265"
    cronjob, _ = _manifests(ray_address=address, image="registry.example/mergeflow:1.2")
    spec = cronjob["spec"]
    assert spec["schedule"] == "0 2 * * *" and spec["timeZone"] == "UTC"
    assert spec["concurrencyPolicy"] == "Forbid"
    assert spec["startingDeadlineSeconds"] > 0
    assert 0 <= spec["jobTemplate"]["spec"]["backoffLimit"] <= 2
    pod = spec["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    container = _container(cronjob)
    assert container["image"] == "registry.example/mergeflow:1.2"
    assert container["command"] == ["mergeflow", "submit", "workflows/recurring.yaml", "--verb", "round", "--wait",
                                    "--address", address]
    for meta in (cronjob["metadata"], spec["jobTemplate"]["metadata"], spec["jobTemplate"]["spec"]["template"]["metadata"]):
        assert meta["labels"] == {"app.kubernetes.io/name": "mergeflow", "mergeflow.workflow": "recurring"}
    assert "namespace" not in cronjob["metadata"]
    assert _manifests(namespace="ml")[0]["metadata"]["namespace"] == "ml"


def test_credentials_come_from_a_secret_never_inline():
    cronjob, raycronjob = _manifests(tracking_secret="team-mlflow")
    container = _container(cronjob)
    assert container["envFrom"] == [{"secretRef": {"name": "team-mlflow"}}]
    assert "env" not in container
    text = "".join(render_kubernetes(**EXAMPLE_ARGS, tracking_secret="team-mlflow").values())
    for word in ("MLFLOW_TRACKING_PASSWORD", "AWS_SECRET_ACCESS_KEY", "password", "token"):
        assert word.lower() not in text.lower()
    assert "envFrom" not in _container(_manifests(tracking_secret=None)[0])


def test_raycronjob_runs_the_round_on_the_selected_cluster():
    _, raycronjob = _manifests(ray_address="http://prod-head-svc.ml.svc.cluster.local:8265", cron="*/30 * * * *",
                               timezone="Asia/Taipei")
    assert raycronjob["apiVersion"] == "ray.io/v1" and raycronjob["kind"] == "RayCronJob"
    spec = raycronjob["spec"]
    assert spec["schedule"] == "*/30 * * * *" and spec["timeZone"] == "Asia/Taipei"
    job = spec["jobTemplate"]
    assert job["entrypoint"] == "mergeflow round workflows/recurring.yaml"
    assert job["clusterSelector"] == {"ray.io/cluster": "prod"}
    # KubeRay rejects a RayJob in clusterSelector mode with backoffLimit > 0 or suspend
    assert "backoffLimit" not in job and "suspend" not in job and "rayClusterSpec" not in job
    assert job["metadata"] == {"mergeflow.workflow": "recurring"}
    quoted = _manifests(spec_path="specs/my round.yaml")[1]["spec"]["jobTemplate"]["entrypoint"]
    assert quoted == "mergeflow round 'specs/my round.yaml'"


def test_names_are_dns_1123_within_the_limits():
    weird = "Nightly_ColD.Fusion--Round__for_the_Team_With_A_Very_Long_Workflow_Name_v2"
    cronjob, raycronjob = _manifests(name=weird)
    names = cronjob["metadata"]["name"], raycronjob["metadata"]["name"]
    for object_name, limit in zip(names, (52, 36), strict=True):  # CronJob limit; KubeRay 1.7 MaxRayCronJobNameLength
        assert DNS1123_LABEL.match(object_name), object_name
        assert len(object_name) <= limit and object_name.startswith("mergeflow-round-")
    other = _manifests(name=weird + "3")[0]["metadata"]["name"]
    assert other != names[0]  # shortened names keep a hash of the full name
    label = cronjob["metadata"]["labels"]["mergeflow.workflow"]
    assert len(label) <= 63 and re.match(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$", label)
    assert _manifests(name="A b/c")[0]["metadata"]["name"] == "mergeflow-round-a-b-c"


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"ray_address": "http://10.0.0.7:8265"}, "head-svc"),
    ({"ray_address": "ray://head:10001"}, "cannot tell the RayCluster"),
    ({"cron": "0 2 * *"}, "five-field cron"),
    ({"cron": "CRON_TZ=UTC 0 2 * * *"}, "give the time zone as timezone"),
    ({"timezone": ""}, "IANA time zone"),
])
def test_unusable_arguments_say_what_to_give(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        render_kubernetes(**{**EXAMPLE_ARGS, **kwargs})


def test_ray_cluster_name_from_the_head_service():
    assert ray_cluster_name("http://raycluster-head-svc:8265") == "raycluster"
    assert ray_cluster_name("raycluster-kuberay-head-svc.default.svc.cluster.local:8265") == "raycluster-kuberay"


@pytest.mark.parametrize(("seconds", "cron"), [
    (60, "* * * * *"), (300, "*/5 * * * *"), (900, "*/15 * * * *"), (1800, "*/30 * * * *"),
    (3600, "0 * * * *"), (2 * 3600, "0 */2 * * *"), (6 * 3600, "0 */6 * * *"), (12 * 3600, "0 */12 * * *"),
    (86400, "0 0 * * *"), (7 * 86400, "0 0 * * 0"),
])
def test_interval_to_cron(seconds, cron):
    assert interval_to_cron(seconds) == cron


@pytest.mark.parametrize("seconds", [7, 90, 420, 5000, 5 * 3600, 2 * 86400, 0, -60])
def test_interval_without_exact_cron_is_refused(seconds):
    with pytest.raises(ValueError, match=rf"\(got {seconds}\)|of {seconds} s\b") as info:
        interval_to_cron(seconds)
    if seconds > 0:
        assert "cron expression instead" in str(info.value)


def test_renderer_imports_only_stdlib_and_yaml():
    source = (Path(__file__).resolve().parent.parent / "pipeline" / "recurring" / "emit.py").read_text()
    imported = {line.split()[1].split(".")[0] for line in source.splitlines() if line.startswith(("import ", "from "))}
    assert imported <= {"__future__", "hashlib", "re", "shlex", "urllib", "yaml"}, imported

