"""One reconcile pass: observed pods and nodes -> plan -> API calls, Events -> status.

Observations come from kopf's indices (watch streams kept in memory). A pod this operator just created or
force-deleted may not have reached the index yet, so `ResourceState` remembers those for a short while;
everything else that must survive a restart lives in the cluster (pod labels, status.slots).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import logging
import time
from typing import Any

import kopf
from kubernetes.client.exceptions import ApiException

from slam_operator import pods as render
from slam_operator.failover import Create, Delete, NodeView, Plan, PodView, plan
from slam_operator.kube import Kube
from slam_operator.spec import SLAMInferenceSpec
from slam_operator.status import build_status, changes, slot_memory

EXPECT_SECONDS = 30.0  # how long a created pod counts as present before the index shows it
SERVICES_RECHECK_SECONDS = 60.0
FAILOVER_REASONS = {"NodeFailure", "PodFailed", "Evicted", "PodGone"}


@dataclasses.dataclass
class ResourceState:
    """In-memory bookkeeping of one SLAMInference (kopf keeps it in the object's memo)."""
    lock: asyncio.Lock = dataclasses.field(default_factory=asyncio.Lock)
    expected: dict[str, tuple[PodView, float]] = dataclasses.field(default_factory=dict)
    forced: dict[str, float] = dataclasses.field(default_factory=dict)  # force-deleted, maybe still indexed
    graceful: dict[str, int] = dataclasses.field(default_factory=dict)  # pod -> slot, deleted gracefully by us
    services: tuple[str, float] | None = None  # the Service manifests last applied, and when


def state_of(memo: Any) -> ResourceState:
    if not isinstance(memo.get("slam"), ResourceState):
        memo["slam"] = ResourceState()
    return memo["slam"]


def _time(text: str | None) -> datetime.datetime | None:
    if not text:
        return None
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))


def pod_view(pod: Any) -> PodView | None:
    meta, status = pod.get("metadata") or {}, pod.get("status") or {}
    labels, annotations = meta.get("labels") or {}, meta.get("annotations") or {}
    try:
        slot, epoch = int(labels[render.SLOT_LABEL]), int(labels.get(render.EPOCH_LABEL, 0))
    except (KeyError, ValueError):
        return None  # not one of ours
    ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])
    restored = annotations.get(render.RESTORED_ANNOTATION)
    return PodView(name=meta.get("name", ""), slot=slot, epoch=epoch, phase=status.get("phase") or "Pending",
                   ready=ready, node=(pod.get("spec") or {}).get("nodeName"),
                   deleting=bool(meta.get("deletionTimestamp")), template=annotations.get(render.TEMPLATE_ANNOTATION),
                   reason=status.get("reason"), restored=int(restored) if str(restored).isdigit() else None)


def node_view(status: Any) -> NodeView:
    ready = next((c for c in (status or {}).get("conditions") or [] if c.get("type") == "Ready"), None)
    if ready is None:
        return NodeView(ready=False)
    return NodeView(ready=ready.get("status") == "True", since=_time(ready.get("lastTransitionTime")))


def observed_pods(indexed: list[PodView], state: ResourceState) -> list[PodView]:
    """The index's pods, corrected by what this operator did that the index may not show yet."""
    now = time.monotonic()
    seen = {p.name: p for p in indexed}
    for name, (_, created) in list(state.expected.items()):
        if name in seen or now - created > EXPECT_SECONDS:
            del state.expected[name]
    for name in list(state.forced):
        if name not in seen:
            del state.forced[name]
    views = [dataclasses.replace(p, deleting=True) if p.name in state.graceful else p
             for p in seen.values() if p.name not in state.forced]
    return views + [view for view, _ in state.expected.values()]


class Pass:
    """Carries out a plan for one resource and records the outcome."""

    def __init__(self, kube: Kube, body: Any, spec: SLAMInferenceSpec, state: ResourceState, logger: logging.Logger):
        self.kube, self.body, self.spec, self.state, self.logger = kube, body, spec, state, logger
        self.name, self.namespace = body["metadata"]["name"], body["metadata"]["namespace"]
        self.errors: list[str] = []
        self.drained: set[str] = set()  # gracefully deleted pods that are gone
        self.done: list[Create | Delete] = []  # the actions that succeeded (only those count as failovers)

    async def ensure_services(self) -> None:
        """Apply the Services when they changed, and now and then anyway (someone may have deleted them)."""
        manifests = render.services(self.name, self.namespace, self.spec)
        key = repr(manifests)
        if self.state.services and self.state.services[0] == key and \
                time.monotonic() - self.state.services[1] < SERVICES_RECHECK_SECONDS:
            return
        for manifest in manifests:
            kopf.adopt(manifest, owner=self.body)
            await self.kube.apply_service(self.namespace, manifest)
        self.state.services = (key, time.monotonic())

    async def create(self, action: Create, template: str) -> None:
        manifest = render.pod_manifest(self.name, self.namespace, self.spec, action.slot, action.epoch,
                                       action.avoid_nodes, action.shun_nodes)
        kopf.adopt(manifest, owner=self.body)
        created = await self.kube.create_pod(self.namespace, manifest)
        pod = created["metadata"]["name"]
        self.state.expected[pod] = (PodView(pod, action.slot, action.epoch, template=template), time.monotonic())
        for old in [p for p, slot in self.state.graceful.items() if slot == action.slot and p in self.drained]:
            del self.state.graceful[old]
        restore = " restoring its checkpointed requests" if action.epoch > 0 and self.spec.checkpoint.enabled else ""
        avoid = f", not on node {', '.join(action.avoid_nodes)}" if action.avoid_nodes else ""
        message = f"slot {action.slot}: created pod {pod} at epoch {action.epoch}{restore}{avoid} ({action.reason})"
        failover = action.reason in FAILOVER_REASONS
        kopf.event(self.body, type="Warning" if failover else "Normal", reason="Failover" if failover else
                   action.reason, message=message)
        self.logger.info(message)

    async def delete(self, action: Delete) -> None:
        found = await self.kube.delete_pod(self.namespace, action.pod, force=action.force)
        if action.force:
            self.state.forced[action.pod] = time.monotonic()
        else:
            self.state.graceful[action.pod] = action.slot
        how = "force-deleted" if action.force else "deleted (graceful: it drains and checkpoints)"
        message = f"slot {action.slot}: {how} pod {action.pod}: {action.message or action.reason}"
        warn = action.reason in FAILOVER_REASONS
        if found or warn:
            kopf.event(self.body, type="Warning" if warn else "Normal", reason=action.reason, message=message)
            self.logger.info(message)

    def plan(self, indexed: list[PodView], nodes: dict[str, NodeView], memory, now, template: str) -> Plan:
        self.drained = set(self.state.graceful) - {p.name for p in indexed}
        for name in [n for n in self.drained if self.state.graceful[n] >= self.spec.replicas]:
            del self.state.graceful[name]  # a removed slot's pod is gone: nothing to replace
            self.drained.discard(name)
        return plan(self.spec.replicas, template, observed_pods(indexed, self.state), nodes, memory, now,
                    self.spec.nodeFailureGraceSeconds, frozenset(self.state.graceful[p] for p in self.drained))

    async def run(self, actions: list[Create | Delete], template: str) -> None:
        # Deletions first: a slot's replacement is created after its failed pod is gone.
        for action in sorted(actions, key=lambda a: isinstance(a, Create)):
            try:
                if isinstance(action, Create):
                    await self.create(action, template)
                else:
                    await self.delete(action)
            except ApiException as e:
                self.errors.append(f"slot {action.slot}: {action.reason}: {e.status} {e.reason}")
            else:
                self.done.append(action)


async def reconcile(kube: Kube, body: Any, spec: SLAMInferenceSpec, indexed: list[PodView],
                    nodes: dict[str, NodeView], memo: Any, patch: Any, logger: logging.Logger) -> Plan:
    """Bring the pods one step closer to the spec and patch the status; TemporaryError if a call failed."""
    state = state_of(memo)
    async with state.lock:
        work = Pass(kube, body, spec, state, logger)
        await work.ensure_services()
        status = dict(body.get("status") or {})
        memory = slot_memory(status)
        now = datetime.datetime.now(datetime.timezone.utc)
        template = render.template_hash(work.name, work.namespace, spec)
        todo = work.plan(indexed, nodes, memory, now, template)
        if any(isinstance(a, Create) for a in todo.actions):
            # The index can lag (at startup, after a peering pause, after a reconnect): before creating a
            # pod, which cannot be undone without a failover, ask the API server itself.
            indexed = [v for v in map(pod_view, await kube.list_pods(work.namespace, work.name)) if v]
            todo = work.plan(indexed, nodes, memory, now, template)
        await work.run(todo.actions, template)
        after = observed_pods(indexed, state)
        new = build_status(work.name, body["metadata"].get("generation"), spec.replicas, after, memory,
                           Plan(work.done), status, now)
        patch.status.update(changes(status, new))
    if work.errors:
        raise kopf.TemporaryError("; ".join(work.errors), delay=2)
    return todo
