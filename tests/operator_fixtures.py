"""Fixtures of the operator tests: an emulated cluster with three nodes, the operator's handlers in a fresh
registry, and helpers that wait for the cluster to reach a state."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import kmock
import kopf
import kubernetes
import pytest_asyncio

from kube_fixtures import POD, SLAM, ClusterEmulator, Kubelet, running_operator
from slam_operator.handlers import OperatorConfig, register

NAMESPACE = "default"
RECONCILE_S = 0.25  # the timer in tests; users get 2 s
NODES = ("node-a", "node-b", "node-c")


def slam_resource(name: str = "llm", **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "slam.dev/v1alpha1", "kind": "SLAMInference",
            "metadata": {"name": name, "namespace": NAMESPACE}, "spec": spec}


def make_registry(k8s: ClusterEmulator) -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()
    configuration = kubernetes.client.Configuration(host=str(k8s.url).rstrip("/"))
    register(registry, OperatorConfig(kube=configuration, reconcile_seconds=RECONCILE_S, cleanup_poll_seconds=0.2))
    return registry


def operator(k8s: ClusterEmulator, **kwargs: Any):
    """The real kopf runtime with the operator's handlers, against the emulator."""
    return running_operator(make_registry(k8s), namespaces=(NAMESPACE,), **kwargs)


@pytest_asyncio.fixture
async def k8s():
    async with ClusterEmulator() as emulator, kmock.Server(emulator):
        await emulator.add_namespace(NAMESPACE)
        for node in NODES:
            await emulator.add_node(node)
        yield emulator


@pytest_asyncio.fixture
async def kubelet(k8s: ClusterEmulator):
    async with Kubelet(k8s) as stand_in:
        yield stand_in


async def eventually(check: Callable[[], Any], timeout: float = 20.0, what: str = "") -> Any:
    """Poll `check` until it returns something truthy; fail with `what` and the last value."""
    deadline, value = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or check}: last {value!r}")


def live_pods(k8s: ClusterEmulator, name: str = "llm") -> list[dict[str, Any]]:
    return [p for p in k8s.pods(NAMESPACE, f"app.kubernetes.io/instance={name}")
            if not p["metadata"].get("deletionTimestamp")]


def by_slot(pods: list[dict[str, Any]]) -> dict[int, list[dict[str, Any]]]:
    slots: dict[int, list[dict[str, Any]]] = {}
    for pod in pods:
        slots.setdefault(int(pod["metadata"]["labels"]["slam.dev/slot"]), []).append(pod)
    return slots


def one_ready_pod_per_slot(k8s: ClusterEmulator, replicas: int, name: str = "llm") -> dict[int, dict] | None:
    slots = by_slot(k8s.pods(NAMESPACE, f"app.kubernetes.io/instance={name}"))
    if sorted(slots) != list(range(replicas)) or any(len(p) != 1 for p in slots.values()):
        return None
    pods = {slot: p[0] for slot, p in slots.items()}
    ready = all(c.get("status") == "True" for p in pods.values() for c in p["status"].get("conditions", [])
                if c["type"] == "Ready") and all(p["status"].get("conditions") for p in pods.values())
    return pods if ready else None


def resource(k8s: ClusterEmulator, name: str = "llm") -> dict[str, Any] | None:
    return k8s.get(SLAM, NAMESPACE, name)


def status(k8s: ClusterEmulator, name: str = "llm") -> dict[str, Any]:
    return (resource(k8s, name) or {}).get("status") or {}


def event_reasons(k8s: ClusterEmulator, name: str = "llm") -> list[str]:
    return [e.get("reason") for e in k8s.events(NAMESPACE)
            if e.get("involvedObject", {}).get("kind") == "SLAMInference" and e["involvedObject"].get("name") == name]


def condition(k8s: ClusterEmulator, kind: str, name: str = "llm") -> dict[str, Any]:
    return next((c for c in status(k8s, name).get("conditions") or [] if c["type"] == kind), {})


__all__ = ["NAMESPACE", "POD", "SLAM", "by_slot", "condition", "event_reasons", "eventually", "k8s", "kubelet",
           "live_pods", "one_ready_pod_per_slot", "operator", "resource", "slam_resource", "status"]
