"""Offline stand-ins for what the API server does with a CRD: default, validate, evaluate CEL rules.

The schema checks run through jsonschema, the rules through cel-python (celpy), so a custom resource is
judged by real engines. What they cannot show (CEL cost limits, admission) is left to the kind e2e run.
"""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import celpy
import jsonschema
import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "charts"))
from sync_crds import to_jsonschema  # the one converter; it also writes values.schema.json

MANIFESTS = ROOT / "manifests"
CHART = ROOT / "charts" / "slam"
KUBE_VERSION = "1.34.0"  # a recent release that kubernetes-validate ships schemas for
CRD_API_VERSIONS = ("slam.dev/v1alpha1", "kopf.dev/v1", "monitoring.coreos.com/v1")


def load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def load_crd() -> dict:
    (crd,) = load_docs(MANIFESTS / "crd.yaml")
    return crd


def version_schema(crd: dict, version: str = "v1alpha1") -> dict:
    (v,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    return v["schema"]["openAPIV3Schema"]


def apply_defaults(schema: dict, value: Any) -> Any:
    """Fill `default`s top-down the way the API server does: a defaulted parent gets its own defaults."""
    if isinstance(value, dict) and "properties" in schema:
        value = dict(value)
        for key, sub in schema["properties"].items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
            if key in value:
                value[key] = apply_defaults(sub, value[key])
    elif isinstance(value, dict) and isinstance(schema.get("additionalProperties"), dict):
        value = {k: apply_defaults(schema["additionalProperties"], v) for k, v in value.items()}
    elif isinstance(value, list) and "items" in schema:
        value = [apply_defaults(schema["items"], v) for v in value]
    return value


@dataclass
class Rule:
    path: str  # where the rule sits, e.g. "spec.cache"
    rule: str
    message: str


def cel_rules(schema: dict, path: str = "") -> list[Rule]:
    found = [Rule(path, r["rule"], r.get("message", r["rule"])) for r in schema.get("x-kubernetes-validations", [])]
    for key, sub in schema.get("properties", {}).items():
        found += cel_rules(sub, f"{path}.{key}".lstrip("."))
    if "items" in schema:
        found += cel_rules(schema["items"], f"{path}[]")
    return found


def _values_at(obj: Any, path: str) -> list[Any]:
    values = [obj]
    for part in filter(None, path.split(".")):
        is_list = part.endswith("[]")
        key = part.removesuffix("[]")
        values = [v[key] for v in values if isinstance(v, dict) and key in v]
        if is_list:
            values = [item for v in values for item in v]
    return values


_CEL = celpy.Environment()


def check_cel(schema: dict, obj: dict) -> list[str]:
    """The messages of the CEL rules `obj` breaks (an evaluation error counts as a failure, as in k8s)."""
    failures = []
    for r in cel_rules(schema):
        program = _CEL.program(_CEL.compile(r.rule))
        for value in _values_at(obj, r.path):
            result = program.evaluate({"self": celpy.json_to_cel(value)})
            if result is not True and not (isinstance(result, celpy.celtypes.BoolType) and bool(result)):
                failures.append(f"{r.path}: {r.message}")
    return failures


class Invalid(Exception):
    """What the API server would answer with 422: every problem, each naming its field or rule."""


def admit(crd: dict, obj: dict) -> dict:
    """Default `obj`, then validate it against the CRD's schema and CEL rules; returns the defaulted object."""
    schema = version_schema(crd, obj["apiVersion"].split("/")[1])
    defaulted = apply_defaults(schema, obj)
    validator = jsonschema.Draft7Validator(to_jsonschema(schema))
    problems = [
        f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
        for e in validator.iter_errors(defaulted)
    ]
    if not problems:  # the API server evaluates rules only on a schema-valid object
        problems = check_cel(schema, defaulted)
    if problems:
        raise Invalid("; ".join(problems))
    return defaulted


def structural_problems(schema: dict, path: str = "") -> list[str]:
    """Where a schema breaks the rules for structural schemas (every node typed, no properties together
    with additionalProperties, int-or-string only through its marker)."""
    problems = []
    typed = "type" in schema or schema.get("x-kubernetes-int-or-string") or schema.get(
        "x-kubernetes-preserve-unknown-fields")
    if not typed:
        problems.append(f"{path or '<root>'}: no type")
    if "properties" in schema and "additionalProperties" in schema:
        problems.append(f"{path}: properties and additionalProperties together")
    if "anyOf" in schema and not schema.get("x-kubernetes-int-or-string"):
        problems.append(f"{path}: anyOf outside int-or-string")
    for key, sub in schema.get("properties", {}).items():
        problems += structural_problems(sub, f"{path}.{key}")
    if isinstance(schema.get("additionalProperties"), dict):
        problems += structural_problems(schema["additionalProperties"], f"{path}.*")
    if "items" in schema:
        problems += structural_problems(schema["items"], f"{path}[]")
    return problems


# What the operator does with the API, and nothing more.
OPERATOR_GRANTS = {
    ("slam.dev", "slaminferences"): {"get", "list", "watch", "patch", "update"},
    ("slam.dev", "slaminferences/status"): {"get", "patch", "update"},
    ("", "pods"): {"get", "list", "watch", "create", "delete", "patch"},
    ("", "services"): {"get", "list", "watch", "create", "patch", "delete"},
    ("", "nodes"): {"get", "list", "watch"},
    ("", "events"): {"create", "patch"},
    ("events.k8s.io", "events"): {"create", "patch"},
    ("", "secrets"): {"get"},
    ("", "namespaces"): {"get", "list", "watch"},
    ("apiextensions.k8s.io", "customresourcedefinitions"): {"get", "list", "watch"},
    ("kopf.dev", "clusterkopfpeerings"): {"get", "list", "watch", "patch", "create"},
    ("kopf.dev", "kopfpeerings"): {"get", "list", "watch", "patch"},
}


def granted(docs: list[dict]) -> dict[tuple[str, str], set[str]]:
    """(apiGroup, resource) -> verbs over every Role and ClusterRole in `docs`; wildcards kept as written."""
    grants: dict[tuple[str, str], set[str]] = {}
    for doc in docs:
        if doc["kind"] not in ("Role", "ClusterRole"):
            continue
        for rule in doc.get("rules", []):
            for group in rule.get("apiGroups", []):
                for resource in rule.get("resources", []):
                    grants.setdefault((group, resource), set()).update(rule["verbs"])
    return grants


def wildcards(docs: list[dict]) -> list[str]:
    found = []
    for doc in docs:
        for rule in doc.get("rules", []) if doc["kind"] in ("Role", "ClusterRole") else []:
            for field in ("apiGroups", "resources", "verbs", "nonResourceURLs"):
                found += [f"{doc['kind']} {doc['metadata']['name']} {field}" for v in rule.get(field, []) if "*" in v]
    return found


def crds_by_kind(docs: list[dict]) -> dict[tuple[str, str], dict]:
    return {(d["spec"]["group"], d["spec"]["names"]["kind"]): d for d in docs if d["kind"] == "CustomResourceDefinition"}


def validate_object(doc: dict, crds: dict[tuple[str, str], dict]) -> str:
    """Validate one object as the API server would: built-in kinds with kubernetes-validate, custom kinds
    against their CRD. Returns how it was checked; a kind with no schema at hand returns "unchecked"."""
    group = doc["apiVersion"].rpartition("/")[0]
    if (group, doc["kind"]) in crds:
        admit(crds[(group, doc["kind"])], doc)
        return "crd"
    if group.endswith(("monitoring.coreos.com", "kopf.dev")):
        return "unchecked"
    kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
    return "kubernetes"
