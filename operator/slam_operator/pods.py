"""Pod and Service manifests of a SLAMInference (plain dicts, as the API takes them)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from slam_operator.settings import API_KEY_DIR, MODELS_DIR, server_env, server_settings
from slam_operator.spec import SLAMInferenceSpec

NAME_LABEL = "app.kubernetes.io/name"
INSTANCE_LABEL = "app.kubernetes.io/instance"
SLOT_LABEL = "slam.dev/slot"
EPOCH_LABEL = "slam.dev/epoch"
TEMPLATE_ANNOTATION = "slam.dev/template-hash"  # the spec a pod was rendered from (rolling replacement)
RESTORED_ANNOTATION = "slam.dev/restored-requests"  # optional: set by whoever learns it from the server
HOSTNAME_LABEL = "kubernetes.io/hostname"
NODE_FAILURE_TAINTS = ("node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable")
TERMINATION_GRACE_SECONDS = 60  # SIGTERM drain: the server checkpoints every running request before exiting


def selector(name: str) -> dict[str, str]:
    return {NAME_LABEL: "slam", INSTANCE_LABEL: name}


def selector_text(name: str) -> str:
    return ",".join(f"{k}={v}" for k, v in selector(name).items())


def template_hash(name: str, namespace: str, spec: SLAMInferenceSpec) -> str:
    """Changes exactly when a pod would be rendered differently (slot 0, epoch 0 stands for all slots)."""
    rendered = _render(name, namespace, spec, 0, 0, [], [])
    return hashlib.sha256(json.dumps(rendered, sort_keys=True).encode()).hexdigest()[:16]


def _tolerations(spec: SLAMInferenceSpec) -> list[dict[str, Any]]:
    # Kubernetes adds not-ready/unreachable tolerations of 300 s to every pod, which would keep a pod bound
    # to a dead node for five minutes; ours evict after the spec's grace, the same the operator waits.
    own = [t for t in spec.tolerations if t.get("key") not in NODE_FAILURE_TAINTS]
    grace = spec.nodeFailureGraceSeconds
    return own + [{"key": key, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": grace}
                  for key in NODE_FAILURE_TAINTS]


def _not_on(nodes: list[str]) -> dict[str, Any]:
    return {"matchExpressions": [{"key": HOSTNAME_LABEL, "operator": "NotIn", "values": sorted(nodes)}]}


def _affinity(avoid_nodes: list[str], shun_nodes: list[str]) -> dict[str, Any] | None:
    affinity: dict[str, Any] = {}
    if avoid_nodes:
        affinity["requiredDuringSchedulingIgnoredDuringExecution"] = {"nodeSelectorTerms": [_not_on(avoid_nodes)]}
    if shun_nodes:
        preferred = [{"weight": 100, "preference": _not_on(shun_nodes)}]
        affinity["preferredDuringSchedulingIgnoredDuringExecution"] = preferred
    return {"nodeAffinity": affinity} if affinity else None


def _resources(spec: SLAMInferenceSpec) -> dict[str, Any]:
    requests: dict[str, Any] = {}
    limits: dict[str, Any] = {}
    if spec.resources.cpu is not None:
        requests["cpu"] = str(spec.resources.cpu)
    if spec.resources.memory is not None:
        requests["memory"] = limits["memory"] = str(spec.resources.memory)
    if spec.resources.gpus:
        limits["nvidia.com/gpu"] = str(spec.resources.gpus)
    return {k: v for k, v in (("requests", requests), ("limits", limits)) if v}


def _volumes(spec: SLAMInferenceSpec) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    volumes, mounts = [], []
    if spec.server.apiKeySecretRef is not None:
        ref = spec.server.apiKeySecretRef
        items = [{"key": ref.key, "path": ref.key}]
        volumes.append({"name": "api-key", "secret": {"secretName": ref.name, "items": items}})
        mounts.append({"name": "api-key", "mountPath": API_KEY_DIR, "readOnly": True})
    if spec.model.pvcName:
        volumes.append({"name": "models", "persistentVolumeClaim": {"claimName": spec.model.pvcName, "readOnly": True}})
        mounts.append({"name": "models", "mountPath": MODELS_DIR, "readOnly": True})
    return volumes, mounts


def _probe(path: str, period: int, failures: int) -> dict[str, Any]:
    return {"httpGet": {"path": path, "port": "http"}, "periodSeconds": period, "failureThreshold": failures}


def pod_manifest(name: str, namespace: str, spec: SLAMInferenceSpec, slot: int, epoch: int,
                 avoid_nodes: tuple[str, ...] = (), shun_nodes: tuple[str, ...] = ()) -> dict[str, Any]:
    """The pod of `slot` at `epoch`; it must not run on `avoid_nodes` and prefers not to on `shun_nodes`."""
    pod = _render(name, namespace, spec, slot, epoch, list(avoid_nodes), list(shun_nodes))
    pod["metadata"]["annotations"] = {TEMPLATE_ANNOTATION: template_hash(name, namespace, spec)}
    return pod


def _render(name: str, namespace: str, spec: SLAMInferenceSpec, slot: int, epoch: int,
            avoid_nodes: list[str], shun_nodes: list[str]) -> dict[str, Any]:
    settings = server_settings(spec, name, namespace, slot, epoch)
    volumes, mounts = _volumes(spec)
    container = {
        "name": "server",
        "image": spec.image,
        "imagePullPolicy": spec.imagePullPolicy,
        "command": ["slam", "serve"],
        "ports": [{"name": "http", "containerPort": spec.server.port}],
        "env": server_env(spec, settings),
        "resources": _resources(spec),
        "volumeMounts": mounts,
        # Model loading can take minutes: the startup probe holds liveness off until /health answers.
        "startupProbe": _probe("/health", 5, 120),
        "livenessProbe": _probe("/health", 10, 3),
        "readinessProbe": _probe("/ready", 2, 1),
    }
    pod_spec: dict[str, Any] = {
        "hostname": f"{name}-{slot}",
        "subdomain": f"{name}-pods",
        # A crashed server must not restart in place: its replacement takes the next epoch (fencing).
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": TERMINATION_GRACE_SECONDS,
        "containers": [container],
        "volumes": volumes,
        "nodeSelector": dict(spec.nodeSelector),
        "tolerations": _tolerations(spec),
    }
    affinity = _affinity(avoid_nodes, shun_nodes)
    if affinity:
        pod_spec["affinity"] = affinity
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": f"{name}-{slot}-",
            "namespace": namespace,
            "labels": {**selector(name), SLOT_LABEL: str(slot), EPOCH_LABEL: str(epoch)},
        },
        "spec": pod_spec,
    }


def services(name: str, namespace: str, spec: SLAMInferenceSpec) -> list[dict[str, Any]]:
    """The clients' Service and the headless one that gives each pod its DNS name."""
    ports = [{"name": "http", "port": spec.server.port, "targetPort": "http", "protocol": "TCP"}]
    meta = {"namespace": namespace, "labels": selector(name)}
    client = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, **meta},
              "spec": {"type": "ClusterIP", "selector": selector(name), "ports": ports}}
    headless = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": f"{name}-pods", **meta},
                "spec": {"clusterIP": "None", "publishNotReadyAddresses": True, "selector": selector(name),
                         "ports": ports}}
    return [client, headless]
