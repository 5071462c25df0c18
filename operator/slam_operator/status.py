"""status of a SLAMInference from the pods after a reconcile pass (pure functions)."""

from __future__ import annotations

import datetime
from typing import Any

from slam_operator.failover import REMOVED, Create, Delete, Plan, PodView, SlotMemory, slot_phase
from slam_operator.pods import selector_text

PROGRESS_REASONS = {"NodeFailure": "FailingOver", "PodFailed": "FailingOver", "Evicted": "FailingOver",
                    "PodGone": "FailingOver", "Created": "Creating", "ScaledUp": "ScalingUp",
                    "ScaledDown": "ScalingDown", "Updating": "Updating", "Updated": "Updating",
                    "Duplicate": "Deduplicating"}


def slot_memory(status: dict[str, Any] | None) -> dict[int, SlotMemory]:
    """The slots' last known epochs (and phases) from status.slots, which outlive an operator restart."""
    memory = {}
    for entry in (status or {}).get("slots") or []:
        try:
            slot, epoch = int(entry["slot"]), int(entry.get("epoch", 0))
        except (KeyError, TypeError, ValueError):
            continue
        memory[slot] = SlotMemory(epoch, entry.get("phase", ""), entry.get("pod"))
    return memory


def slot_entries(replicas: int, pods: list[PodView], memory: dict[int, SlotMemory]) -> list[dict[str, Any]]:
    by_slot: dict[int, list[PodView]] = {}
    for pod in pods:
        by_slot.setdefault(pod.slot, []).append(pod)
    entries = []
    for slot in sorted(set(range(replicas)) | set(by_slot) | set(memory)):
        slot_pods = by_slot.get(slot, [])
        epochs = [p.epoch for p in slot_pods] + ([memory[slot].epoch] if slot in memory else [])
        entry: dict[str, Any] = {"slot": slot, "epoch": max(epochs, default=0),
                                 "phase": slot_phase(slot, replicas, slot_pods), "ready": False}
        live = [p for p in slot_pods if not p.deleting] or slot_pods
        if live:
            pod = max(live, key=lambda p: (p.ready, p.epoch))
            entry.update(pod=pod.name, ready=pod.ready and not pod.deleting)
            if pod.node:
                entry["node"] = pod.node
            if pod.restored is not None:
                entry["restoredRequests"] = pod.restored
        elif slot >= replicas and slot not in memory and entry["phase"] == REMOVED:
            continue
        entries.append(entry)
    return entries


def _condition(old: list[dict[str, Any]], kind: str, ok: bool, reason: str, message: str, now: str) -> dict[str, Any]:
    status = "True" if ok else "False"
    previous = next((c for c in old if c.get("type") == kind), None)
    since = previous["lastTransitionTime"] if previous and previous.get("status") == status and \
        previous.get("lastTransitionTime") else now
    return {"type": kind, "status": status, "reason": reason, "message": message, "lastTransitionTime": since}


def _progress(plan: Plan, slots: list[dict[str, Any]], replicas: int) -> tuple[bool, str, str]:
    if plan.actions:
        reasons = sorted({PROGRESS_REASONS.get(a.reason, a.reason) for a in plan.actions})
        what = "; ".join(f"slot {a.slot}: {'create' if isinstance(a, Create) else 'delete'} ({a.reason})"
                         for a in plan.actions)
        return True, reasons[0], what
    waiting = [s for s in slots if (not s["ready"] if s["slot"] < replicas else s["phase"] != REMOVED)]
    if waiting:
        return True, "Waiting", "waiting for slots " + ", ".join(f"{s['slot']} ({s['phase']})" for s in waiting)
    return False, "Stable", "every slot has one ready pod"


def build_status(name: str, generation: int | None, replicas: int, pods: list[PodView], memory: dict[int, SlotMemory],
                 plan: Plan, old: dict[str, Any] | None, now: datetime.datetime) -> dict[str, Any]:
    old = old or {}
    stamp = now.strftime("%Y-%m-%dT%H:%M:%SZ")
    slots = slot_entries(replicas, pods, memory)
    wanted = [s for s in slots if s["slot"] < replicas]
    running = len({p.slot for p in pods if p.slot < replicas and not p.deleting})
    ready = sum(1 for s in wanted if s["ready"])
    failovers = int(old.get("failovers") or 0) + plan.failovers
    failing = plan.failovers > 0 or any(isinstance(a, Delete) and a.failover for a in plan.actions)
    if ready >= replicas:
        phase = "Running"
    elif failing or old.get("phase") in ("Running", "Degraded"):
        phase = "Degraded"
    else:
        phase = "Pending"
    progressing, reason, message = _progress(plan, slots, replicas)
    conditions = old.get("conditions") or []
    degraded = phase == "Degraded"
    return {
        "phase": phase,
        "replicas": running,
        "readyReplicas": ready,
        "failovers": failovers,
        "selector": selector_text(name),
        "observedGeneration": generation,
        "slots": slots,
        "conditions": [
            _condition(conditions, "Ready", ready >= replicas, "AllReplicasReady" if ready >= replicas else
                       "ReplicasNotReady", f"{ready}/{replicas} replicas ready", stamp),
            _condition(conditions, "Progressing", progressing, reason, message, stamp),
            _condition(conditions, "Degraded", degraded, "FailingOver" if failing else
                       ("ReplicasUnavailable" if degraded else "AsExpected"),
                       f"{replicas - ready} of {replicas} replicas unavailable" if degraded else "", stamp),
        ],
    }


def changes(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """The top-level status fields that differ (patching only those keeps a quiet pass free of API writes)."""
    old = old or {}
    return {k: v for k, v in new.items() if old.get(k) != v}


def failed_status(message: str, generation: int | None, old: dict[str, Any] | None,
                  now: datetime.datetime) -> dict[str, Any]:
    stamp = now.strftime("%Y-%m-%dT%H:%M:%SZ")
    conditions = (old or {}).get("conditions") or []
    return {"phase": "Failed", "observedGeneration": generation,
            "conditions": [_condition(conditions, "Ready", False, "InvalidSpec", message, stamp),
                           _condition(conditions, "Progressing", False, "InvalidSpec", message, stamp),
                           _condition(conditions, "Degraded", True, "InvalidSpec", message, stamp)]}
