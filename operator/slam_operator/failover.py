"""What to do about a SLAMInference's pods: pure functions from observed state to actions.

Level-triggered: `plan()` looks only at what exists now (pods, nodes, the slots' last known epochs), so a
restarted operator, a missed watch event or two operators' overlapping passes converge on the same result.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field

TERMINAL = ("Failed", "Succeeded")  # restartPolicy Never: a server that exited is finished
REPLACING = "Replacing"  # a slot waiting for its gracefully deleted pod to drain
REMOVING = "Removing"  # a slot beyond spec.replicas whose pod drains
REMOVED = "Removed"  # a slot beyond spec.replicas without a pod; kept to remember its epoch


@dataclass(frozen=True)
class PodView:
    name: str
    slot: int
    epoch: int
    phase: str = "Pending"
    ready: bool = False
    node: str | None = None
    deleting: bool = False  # has a deletionTimestamp (Terminating)
    template: str | None = None
    reason: str | None = None  # status.reason, e.g. Evicted
    restored: int | None = None


@dataclass(frozen=True)
class NodeView:
    ready: bool
    since: datetime.datetime | None = None  # last readiness transition; None: unknown (treated as long ago)


@dataclass(frozen=True)
class SlotMemory:
    """What status.slots said about a slot at the previous pass."""
    epoch: int
    phase: str = ""
    pod: str | None = None


@dataclass(frozen=True)
class Create:
    slot: int
    epoch: int
    reason: str  # Created, ScaledUp, Updated, PodFailed, Evicted, PodGone, NodeFailure
    failover: bool = False
    avoid_nodes: tuple[str, ...] = ()  # required anti-affinity
    shun_nodes: tuple[str, ...] = ()  # preferred anti-affinity


@dataclass(frozen=True)
class Delete:
    pod: str
    slot: int
    reason: str  # NodeFailure, PodFailed, Evicted, Duplicate, ScaledDown, Updating
    force: bool = False  # grace period 0
    failover: bool = False
    message: str = ""
    node: str | None = None


@dataclass
class Plan:
    actions: list[Create | Delete] = field(default_factory=list)

    @property
    def failovers(self) -> int:
        return sum(1 for a in self.actions if a.failover)

    def touches(self, slot: int) -> bool:
        return any(a.slot == slot for a in self.actions)


def node_failed(node: str | None, nodes: dict[str, NodeView], now: datetime.datetime, grace: int) -> bool:
    """The pod's node has been NotReady (or is gone) for at least `grace` seconds."""
    if not node:
        return False
    view = nodes.get(node)
    if view is None:
        return True
    if view.ready:
        return False
    return view.since is None or (now - view.since).total_seconds() >= grace


def plan(replicas: int, template: str, pods: list[PodView], nodes: dict[str, NodeView],
         memory: dict[int, SlotMemory], now: datetime.datetime, grace: int,
         drained: frozenset[int] = frozenset()) -> Plan:
    """The actions that bring the pods to one healthy pod per slot in `range(replicas)`, each at the current
    template, and no pods in other slots. `drained` are the slots whose pod this operator deleted gracefully
    (a replacement, not a failure)."""
    result = Plan()
    by_slot: dict[int, list[PodView]] = {}
    for pod in pods:
        by_slot.setdefault(pod.slot, []).append(pod)
    for slot in sorted(set(range(replicas)) | set(by_slot)):
        slot_pods = by_slot.get(slot, [])
        known = max([p.epoch for p in slot_pods] + ([memory[slot].epoch] if slot in memory else []), default=None)
        if slot < replicas:
            result.actions += _keep(slot, slot_pods, known, memory.get(slot), nodes, now, grace, slot in drained)
        else:
            result.actions += _remove(slot, slot_pods, nodes, now, grace)
    if not result.actions:
        result.actions += _roll(replicas, template, by_slot)
    return result


def _failures(slot: int, pods: list[PodView], nodes, now, grace) -> tuple[list[Delete], list[PodView]]:
    """Force-deletes for pods that are dead or on a failed node, and the pods that remain."""
    deletes, remaining = [], []
    for p in pods:
        if node_failed(p.node, nodes, now, grace):
            # Counted even when the pod was already Terminating: the taint manager evicts at the same grace,
            # and a drain its node never finished is a failure too.
            deletes.append(Delete(p.name, slot, "NodeFailure", force=True, failover=True,
                                  message=f"node {p.node} not Ready for {grace}s or more", node=p.node))
        elif p.phase in TERMINAL and not p.deleting:
            reason = "Evicted" if p.reason == "Evicted" else "PodFailed"
            deletes.append(Delete(p.name, slot, reason, force=True, failover=True, node=p.node,
                                  message=f"pod {p.phase}" + (f" ({p.reason})" if p.reason else "")))
        else:
            remaining.append(p)
    return deletes, remaining


def _keep(slot: int, pods: list[PodView], known: int | None, memory: SlotMemory | None, nodes, now, grace,
          drained: bool) -> list[Create | Delete]:
    actions: list[Create | Delete] = []
    deletes, remaining = _failures(slot, pods, nodes, now, grace)
    actions += deletes
    live = [p for p in remaining if not p.deleting]
    if len(live) > 1:  # two pods for one slot (e.g. an operator stopped between create and status): keep one
        keep = max(live, key=lambda p: (p.ready, p.epoch, p.name))
        actions += [Delete(p.name, slot, "Duplicate", message=f"slot {slot} also has {keep.name}")
                    for p in live if p is not keep]
    if remaining:  # a live pod, or one still draining after a graceful delete: wait for it
        return actions
    epoch = 0 if known is None else known + 1
    failed = [d for d in deletes if d.failover] or deletes
    if failed:
        # A dead node is excluded; the node of a pod that failed is only avoided where another one fits.
        down = tuple(sorted({d.node for d in deletes if d.reason == "NodeFailure" and d.node}))
        shun = () if down else tuple(sorted({d.node for d in deletes if d.node}))
        actions.append(Create(slot, epoch, failed[0].reason, avoid_nodes=down, shun_nodes=shun))
    elif memory is None:
        actions.append(Create(slot, epoch, "Created"))
    elif memory.phase == REMOVED:
        actions.append(Create(slot, epoch, "ScaledUp"))
    elif drained:
        actions.append(Create(slot, epoch, "Updated"))
    else:  # its pod vanished without us: deleted by someone, or lost with its node
        actions.append(Create(slot, epoch, "PodGone", failover=True))
    return actions


def _remove(slot: int, pods: list[PodView], nodes, now, grace) -> list[Delete]:
    deletes, remaining = _failures(slot, pods, nodes, now, grace)
    deletes = [Delete(d.pod, slot, d.reason, force=True, message=d.message, node=d.node) for d in deletes]
    return deletes + [Delete(p.name, slot, "ScaledDown", message=f"slot {slot} is beyond spec.replicas")
                      for p in remaining if not p.deleting]


def _roll(replicas: int, template: str, by_slot: dict[int, list[PodView]]) -> list[Delete]:
    """One outdated pod at a time, and only while every slot has exactly one ready pod."""
    current = [by_slot.get(slot, []) for slot in range(replicas)]
    if any(len(pods) != 1 or not pods[0].ready or pods[0].deleting for pods in current):
        return []
    for slot, [pod] in enumerate(current):
        if pod.template != template:
            return [Delete(pod.name, slot, "Updating", message="the spec changed; the replacement restores "
                           "what this pod checkpoints while it drains")]
    return []


def slot_phase(slot: int, replicas: int, pods: list[PodView]) -> str:
    """The phase status.slots shows: the live pod's phase, or what the slot waits for."""
    live = [p for p in pods if not p.deleting]
    if slot >= replicas:
        return REMOVING if pods else REMOVED
    if live:
        return max(live, key=lambda p: (p.ready, p.epoch)).phase
    return REPLACING if pods else "Pending"
