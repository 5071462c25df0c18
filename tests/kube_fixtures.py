"""A Kubernetes cluster for tests, on loopback: an API server (`ClusterEmulator`, kmock's emulator with what
kopf needs, see tests/kube_emulator.py), a stand-in for the scheduler and the kubelets (`Kubelet`), and a way
to run a kopf operator against it (`running_operator`). There is no garbage collector: tests play it.

    async with ClusterEmulator() as k8s, kmock.Server(k8s):
        await k8s.add_namespace("default")
        await k8s.add_node("node-a")
        async with Kubelet(k8s), running_operator(registry):
            ...  # k8s.url, k8s.pods("default"), k8s.patch(...), k8s.set_node_ready("node-a", False)

`Kubelet` only reports phases; a subclass that overrides `start_pod` / `stop_pod` can run each pod's server
as a real local process.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

from kube_emulator import (EVENT, NAMESPACE, NODE, PEERING, POD, RESOURCES, SECRET, SERVICE, SLAM,
                           ClusterEmulator, now_text)

__all__ = ["EVENT", "NAMESPACE", "NODE", "PEERING", "POD", "RESOURCES", "SECRET", "SERVICE", "SLAM",
           "ClusterEmulator", "Kubelet", "running_operator"]


def _fits(pod: dict[str, Any], node: dict[str, Any]) -> bool:
    labels = node["metadata"].get("labels") or {}
    if any(labels.get(k) != v for k, v in ((pod["spec"].get("nodeSelector") or {}).items())):
        return False
    required = ((pod["spec"].get("affinity") or {}).get("nodeAffinity") or {}).get(
        "requiredDuringSchedulingIgnoredDuringExecution")
    if not required:
        return True
    return any(all(_expression(labels, e) for e in term.get("matchExpressions") or [])
               for term in required.get("nodeSelectorTerms") or [])


def _expression(labels: dict[str, str], e: dict[str, Any]) -> bool:
    value, op = labels.get(e["key"]), e["operator"]
    return {"In": lambda: value in e.get("values", []), "NotIn": lambda: value not in e.get("values", []),
            "Exists": lambda: value is not None, "DoesNotExist": lambda: value is None}[op]()


def _shunned(pod: dict[str, Any], node: dict[str, Any]) -> bool:
    preferred = ((pod["spec"].get("affinity") or {}).get("nodeAffinity") or {}).get(
        "preferredDuringSchedulingIgnoredDuringExecution") or []
    labels = node["metadata"].get("labels") or {}
    return any(not all(_expression(labels, e) for e in p["preference"].get("matchExpressions") or [])
               for p in preferred)


class Kubelet:
    """Plays the scheduler and every node's kubelet, in a background task (`async with Kubelet(k8s):`).

    Binds pending pods to Ready nodes that fit (nodeSelector, node affinity; spreading, honouring preferred
    anti-affinity), reports bound pods Running and Ready (when `ready_pods`), and confirms the termination
    of Terminating pods on Ready nodes. Subclass `start_pod` / `stop_pod` to run real processes: `step`
    awaits them one pod after another, so they should start or signal a process and return (report readiness
    or failure later with `set_phase`); `container_env` gives a pod's environment with its Secrets resolved.
    A node marked not Ready leaves its pods as they were (a dead kubelet reports nothing).
    """

    def __init__(self, k8s: ClusterEmulator, period: float = 0.05, ready_pods: bool = True, ready_delay: float = 0.0):
        self.k8s, self.period, self.ready_pods, self.ready_delay = k8s, period, ready_pods, ready_delay
        self._started: dict[str, float] = {}  # pod uid -> when it started Running (not Ready yet)
        self._task: asyncio.Task | None = None

    async def __aenter__(self) -> Kubelet:
        self._task = asyncio.create_task(self._loop())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _loop(self) -> None:
        while True:
            await self.step()
            await asyncio.sleep(self.period)

    async def step(self) -> None:
        nodes = [n for n in self.k8s.list(NODE) if self.k8s.node_ready(n["metadata"]["name"])]
        for pod in self.k8s.pods():
            meta, spec = pod["metadata"], pod["spec"]
            node = spec.get("nodeName")
            if meta.get("deletionTimestamp"):
                if not node or self.k8s.node_ready(node):
                    await self.stop_pod(pod)
                    await self.k8s.finish_termination(meta["namespace"], meta["name"])
            elif not node:
                await self._bind(pod, nodes)
            elif pod["status"].get("phase") == "Pending" and self.k8s.node_ready(node):
                await self.start_pod(pod)
            elif meta["uid"] in self._started and time.monotonic() - self._started[meta["uid"]] >= self.ready_delay:
                del self._started[meta["uid"]]
                await self.set_phase(pod, "Running", ready=True)

    async def _bind(self, pod: dict[str, Any], nodes: list[dict[str, Any]]) -> None:
        fitting = [n for n in nodes if _fits(pod, n)]
        if not fitting:
            return
        load = {n["metadata"]["name"]: 0 for n in fitting}
        for other in self.k8s.pods():
            if other["spec"].get("nodeName") in load:
                load[other["spec"]["nodeName"]] += 1
        best = min(fitting, key=lambda n: (_shunned(pod, n), load[n["metadata"]["name"]], n["metadata"]["name"]))
        await self.k8s.patch(POD, pod["metadata"]["namespace"], pod["metadata"]["name"],
                             {"spec": {"nodeName": best["metadata"]["name"]}})

    def container_env(self, pod: dict[str, Any], container: int = 0) -> dict[str, str]:
        """A container's environment as the kubelet gives it: values, and `secretKeyRef`s read from Secrets."""
        env = {}
        for item in pod["spec"]["containers"][container].get("env") or []:
            ref = (item.get("valueFrom") or {}).get("secretKeyRef")
            if ref is None:
                env[item["name"]] = item.get("value", "")
                continue
            secret = self.k8s.get(SECRET, pod["metadata"]["namespace"], ref["name"]) or {}
            if ref["key"] in (secret.get("data") or {}):
                env[item["name"]] = base64.b64decode(secret["data"][ref["key"]]).decode()
            elif not ref.get("optional"):
                raise KeyError(f"secret {ref['name']!r} has no key {ref['key']!r} (the pod could not start)")
        return env

    async def start_pod(self, pod: dict[str, Any]) -> None:
        """Report the pod Running, and Ready when `ready_pods` (after `ready_delay`); a subclass starts the
        real server here."""
        if self.ready_pods and self.ready_delay > 0:
            self._started[pod["metadata"]["uid"]] = time.monotonic()
        await self.set_phase(pod, "Running", ready=self.ready_pods and self.ready_delay <= 0)

    async def stop_pod(self, pod: dict[str, Any]) -> None:
        """Called before a Terminating pod is removed; a subclass stops the real server here."""

    async def set_phase(self, pod: dict[str, Any], phase: str, ready: bool = False, reason: str | None = None,
                        exit_code: int | None = None) -> None:
        status: dict[str, Any] = {"phase": phase, "conditions": [
            {"type": "Ready", "status": "True" if ready else "False", "lastTransitionTime": now_text()}]}
        if reason:
            status["reason"] = reason
        if exit_code is not None:
            status["containerStatuses"] = [{"name": "server", "ready": False, "state": {
                "terminated": {"exitCode": exit_code, "reason": "Error" if exit_code else "Completed"}}}]
        meta = pod["metadata"]
        await self.k8s.patch(POD, meta["namespace"], meta["name"], {"status": status}, status=True)


@contextlib.asynccontextmanager
async def running_operator(registry: Any, namespaces: tuple[str, ...] = ("default",), clusterwide: bool = False,
                           peering_name: str | None = None, priority: int | None = None,
                           liveness: str | None = None, identity: str | None = None, thread: bool = False,
                           startup_s: float = 20.0) -> AsyncIterator[None]:
    """Run a kopf operator (the registry's handlers, kopf's real runtime) until the block ends.

    `thread=True` runs it in a thread with its own event loop: needed for two operators at once, because an
    operator that stops cancels every task started in its loop after its own start (kopf's hung tasks),
    including the other operator's. Operators sharing a process also need their own `identity` for peering.
    """
    import kopf

    stop, ready = threading.Event(), threading.Event()
    kwargs = dict(registry=registry, namespaces=() if clusterwide else namespaces, clusterwide=clusterwide,
                  standalone=peering_name is None, peering_name=peering_name, priority=priority, identity=identity,
                  liveness_endpoint=liveness, stop_flag=stop, ready_flag=ready)
    if thread:
        runner = threading.Thread(target=lambda: asyncio.run(kopf.operator(**kwargs)), daemon=True)
        runner.start()
        done = lambda: not runner.is_alive()
    else:
        task = asyncio.create_task(kopf.operator(**kwargs))
        done = task.done
    try:
        deadline = time.monotonic() + startup_s
        while not ready.is_set():
            if done() or time.monotonic() > deadline:
                raise RuntimeError("the operator did not start")
            await asyncio.sleep(0.02)
        yield
    finally:
        stop.set()
        deadline = time.monotonic() + 15
        while not done() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if not thread:
            with contextlib.suppress(asyncio.CancelledError):
                task.cancel()
                await task
