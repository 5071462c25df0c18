"""kmock's `KubernetesEmulator` with the API server behaviour kopf and the SLAM operator rely on.

What kmock 0.8's emulator lacks and `ClusterEmulator` adds (design.md section 4):
- server-assigned metadata: uid, resourceVersion (bumped on every write), creationTimestamp, generation
  (bumped when the spec changes), and `generateName`;
- the status subresource: writes to `/status` change only `.status`, other writes never change it;
- label and field selectors on list and watch; a watch from a `resourceVersion` replays what happened
  since (deletions included), so nothing is lost between a client's list and its watch;
- a failed JSON-patch `test` (kopf's optimistic concurrency) answers 422, and a stale
  `metadata.resourceVersion` in a merge patch 409;
- graceful pod deletion: a pod whose node is not Ready (or every pod, with `graceful_pods=True`) stays
  Terminating with a deletionTimestamp until a kubelet finishes it or a delete with grace 0 comes;
- discovery of the resources the operator uses (kopf waits silently for undeclared ones, e.g. namespaces),
  and requests to the namespaces resource itself (kmock reads `/api/v1/namespaces` as a path prefix: 500).
Tests use it through tests/kube_fixtures.py.
"""

from __future__ import annotations

import copy
import datetime
import itertools
import logging
import re
import secrets
import uuid
from collections.abc import AsyncIterator
from typing import Any

import attrs
import jsonpatch
import kmock
from kmock._internal import apps, dicts

log = logging.getLogger(__name__)
POD = kmock.resource("", "v1", "pods")
PEERING = kmock.resource("kopf.dev", "v1", "kopfpeerings")
NODE = kmock.resource("", "v1", "nodes")
EVENT = kmock.resource("", "v1", "events")
NAMESPACE = kmock.resource("", "v1", "namespaces")
SERVICE = kmock.resource("", "v1", "services")
SECRET = kmock.resource("", "v1", "secrets")
SLAM = kmock.resource("slam.dev", "v1alpha1", "slaminferences")
VERBS = {"get", "list", "watch", "create", "update", "patch", "delete"}
RESOURCES = {  # resource: (kind, namespaced, subresources)
    "v1/pods": ("Pod", True, {"status"}),
    "v1/services": ("Service", True, {"status"}),
    "v1/nodes": ("Node", False, {"status"}),
    "v1/events": ("Event", True, set()),
    "v1/secrets": ("Secret", True, set()),
    "v1/namespaces": ("Namespace", False, {"status"}),
    "apiextensions.k8s.io/v1/customresourcedefinitions": ("CustomResourceDefinition", False, {"status"}),
    "slam.dev/v1alpha1/slaminferences": ("SLAMInference", True, {"status", "scale"}),
    "kopf.dev/v1/kopfpeerings": ("KopfPeering", True, set()),
    "kopf.dev/v1/clusterkopfpeerings": ("ClusterKopfPeering", False, set()),
}


# kmock 0.8 reads `/api/v1/namespaces[/NAME]` (the namespaces resource itself) as the prefix of a namespaced
# path and fails with 500; such paths are renamed before kmock parses them and renamed back after.
_NAMESPACES_PATH = re.compile(r"/api/v1/namespaces(/[^/]+)?(/status|/finalize)?/?")
_NAMESPACES_ALIAS = "x-slam-namespaces"


def now_text() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _matches_labels(labels: dict[str, str], selector: str) -> bool:
    """Equality- and set-based label selectors (`a=b,c!=d,e in (x,y),f notin (z),g,!h`)."""
    terms, depth, start = [], 0, 0
    for i, ch in enumerate(selector + ","):
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            terms.append(selector[start:i].strip())
            start = i + 1
    for term in filter(None, terms):
        words = term.split(None, 1)
        if len(words) == 2 and words[1].split(None, 1)[0] in ("in", "notin"):
            op, values = words[1].split(None, 1)
            allowed = {v.strip() for v in values.strip().strip("()").split(",")}
            if (labels.get(words[0]) in allowed) != (op == "in"):
                return False
        elif "!=" in term:
            key, value = term.split("!=", 1)
            if labels.get(key.strip()) == value.strip():
                return False
        elif "=" in term:
            key, value = term.replace("==", "=").split("=", 1)
            if labels.get(key.strip()) != value.strip():
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


def _matches_fields(obj: dict[str, Any], selector: str) -> bool:
    """Field selectors (`metadata.name=x,spec.nodeName!=y,status.phase=Running`)."""
    for term in filter(None, (t.strip() for t in selector.split(","))):
        negate = "!=" in term
        path, value = term.replace("!=", "=").replace("==", "=").split("=", 1)
        actual: Any = obj
        for part in path.strip().split("."):
            actual = actual.get(part) if isinstance(actual, dict) else None
        if ((actual if actual is not None else "") == value.strip()) == negate:
            return False
    return True


@attrs.define(kw_only=True)
class ClusterEmulator(kmock.KubernetesEmulator):
    """kmock's emulator with the API server semantics listed in this module's docstring."""

    graceful_pods: bool = False  # True: every graceful pod delete waits for `finish_termination`
    _versions: itertools.count = attrs.field(factory=lambda: itertools.count(1), init=False)
    _replies: dict[int, dict[str, Any]] = attrs.field(factory=dict, init=False)
    _log: list[tuple[int, Any, dict[str, Any]]] = attrs.field(factory=list, init=False)  # (version, resource, event)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        for key, (kind, namespaced, subresources) in RESOURCES.items():
            self.resources[key] = kmock.ResourceInfo(kind=kind, singular=kind.lower(), namespaced=namespaced,
                                                     verbs=VERBS, subresources=subresources)
        self.resources["slam.dev/v1alpha1/slaminferences"].shortnames = {"slam"}

    # --- requests --------------------------------------------------------------------------------------
    async def __call__(self, raw_request):
        if _NAMESPACES_PATH.fullmatch(raw_request.path):
            path = raw_request.rel_url.path.replace("/namespaces", "/" + _NAMESPACES_ALIAS, 1)
            url = raw_request.rel_url
            raw_request = raw_request.clone(rel_url=url.with_path(path).with_query(url.query))
        return await super().__call__(raw_request)

    async def _handle(self, request: kmock.Request):
        if request.resource is not None and request.resource.plural == _NAMESPACES_ALIAS:
            # kmock matches reactions by the identity of the requests it logged: log the corrected one.
            index = next(i for i, r in enumerate(self._requests) if r is request)
            request = self._requests[index] = attrs.evolve(request, resource=NAMESPACE)
        writes = {kmock.action.CREATE: self._create, kmock.action.UPDATE: self._update,
                  kmock.action.DELETE: self._delete}
        if request.resource is not None and request.action in writes:
            if request.action != kmock.action.CREATE and request.name is None:
                raise kmock.KubernetesError(405, "MethodNotAllowed", "collection writes are not emulated")
            async with self._lock:
                self._replies[request.id] = await writes[request.action](request)
        # Skip KubernetesEmulator._handle (its own, simpler writes) and dispatch reactions and fallbacks.
        return await apps.RawHandler._handle(self, request)

    async def _serve_create(self, request: kmock.Request) -> dict[str, Any]:
        return self._replies.pop(request.id)

    _serve_update = _serve_delete = _serve_create

    async def _serve_list(self, request: kmock.Request) -> dict[str, Any]:
        async with self._lock:
            items = self._select(request)
        return {"apiVersion": "v1", "kind": "List", "items": items,
                "metadata": {"resourceVersion": str(next(self._versions))}}

    async def _serve_watch(self, request: kmock.Request) -> AsyncIterator[Any]:
        yield b""  # send the headers now, so the client sees a started stream
        bus = self._buses[request.resource]
        since = int(request.params.get("resourceVersion") or 0)
        async with self._lock:  # the mark and the backlog are taken at the same instant: no gap, no repeat
            mark = await bus.mark()
            if since:  # what happened after the client's list, deletions included
                backlog = [event for version, resource, event in self._log if resource == request.resource
                           and version > since and self._wanted(request, event["object"])]
            else:
                backlog = [{"type": "ADDED", "object": obj} for obj in self._select(request)]
        log.debug("watch %s in %s from version %s: %d events of backlog", request.resource.plural, request.namespace,
                  since, len(backlog))
        try:
            for event in backlog:
                yield event
            async for event in bus.stream(since=mark):
                if self._wanted(request, event["object"]):
                    yield event
        finally:
            await bus.unmark(mark)

    def _wanted(self, request: kmock.Request, obj: dict[str, Any]) -> bool:
        meta = obj.get("metadata", {})
        if request.namespace is not None and meta.get("namespace") != request.namespace:
            return False
        if request.name is not None and meta.get("name") != request.name:
            return False
        labels = request.params.get("labelSelector")
        fields = request.params.get("fieldSelector")
        return (not labels or _matches_labels(meta.get("labels") or {}, labels)) and \
            (not fields or _matches_fields(obj, fields))

    def _select(self, request: kmock.Request) -> list[dict[str, Any]]:
        return [copy.deepcopy(obj.raw) for (resource, _, _), obj in self.objects.items()
                if resource == request.resource and not obj.deleted and self._wanted(request, obj.raw)]

    # --- writes (called with the lock held) --------------------------------------------------------------
    def _has_status(self, resource: kmock.resource) -> bool:
        return resource in self.resources and "status" in self.resources[resource].subresources

    def _namespaced(self, resource: kmock.resource) -> bool:
        return resource not in self.resources or self.resources[resource].namespaced is not False

    async def _emit(self, resource: kmock.resource, kind: str, obj: dict[str, Any]) -> None:
        obj = copy.deepcopy(obj)
        if kind == "DELETED":  # a deletion is a change of its own, with its own version
            obj["metadata"]["resourceVersion"] = str(next(self._versions))
        event = {"type": kind, "object": obj}
        self._log.append((int(obj["metadata"]["resourceVersion"]), resource, event))
        await self._buses[resource].put(event)

    def _current(self, resource, namespace, name) -> dict[str, Any]:
        key = (resource, namespace if self._namespaced(resource) else None, name)
        if key not in self.objects or self.objects[key].deleted:
            raise kmock.KubernetesObjectNotFoundError(message=f"{resource.plural} {name!r} not found")
        return copy.deepcopy(self.objects[key].raw)

    async def _store(self, resource, obj: dict[str, Any], event: str) -> dict[str, Any]:
        meta = obj["metadata"]
        key = (resource, meta.get("namespace"), meta["name"])
        meta["resourceVersion"] = str(next(self._versions))
        if key in self.objects:
            self.objects[key].history.append(obj)
        else:
            self.objects[key] = obj
        await self._emit(resource, event, obj)
        # The last finalizer gone, the object goes; a terminating pod goes when its kubelet confirms instead.
        terminating = resource == POD and meta.get("deletionGracePeriodSeconds")
        if meta.get("deletionTimestamp") and not meta.get("finalizers") and not terminating:
            self.objects[key].delete()
            await self._emit(resource, "DELETED", obj)
        return copy.deepcopy(obj)

    async def _create(self, request: kmock.Request) -> dict[str, Any]:
        obj = copy.deepcopy(request.data or {})
        meta = obj.setdefault("metadata", {})
        namespace = (request.namespace or meta.get("namespace")) if self._namespaced(request.resource) else None
        name = meta.get("name")
        while not name and meta.get("generateName"):
            candidate = meta["generateName"] + "".join(secrets.choice("bcdfghjklmnpqrstvwxz2456789") for _ in range(5))
            if (request.resource, namespace, candidate) not in self.objects:
                name = candidate
        if not name:
            raise kmock.KubernetesError(422, "Invalid", "metadata.name or metadata.generateName is required")
        key = (request.resource, namespace, name)
        if key in self.objects and not self.objects[key].deleted:
            raise kmock.KubernetesError(409, "AlreadyExists", f"{request.resource.plural} {name!r} already exists")
        meta.update(name=name, uid=str(uuid.uuid4()), creationTimestamp=now_text(), generation=1)
        if namespace:
            meta["namespace"] = namespace
        if self._has_status(request.resource):
            obj.pop("status", None)
        if request.resource == POD:
            obj["status"] = {"phase": "Pending"}
        return await self._store(request.resource, obj, "ADDED")

    async def _update(self, request: kmock.Request) -> dict[str, Any]:
        old = self._current(request.resource, request.namespace, request.name)
        given = (request.data.get("metadata") or {}).get("resourceVersion") if isinstance(request.data, dict) else None
        if given and given != old["metadata"]["resourceVersion"]:
            raise kmock.KubernetesError(409, "Conflict", "the object has been modified; resourceVersion differs")
        try:
            new = copy.deepcopy(dict(dicts.patch_dict(copy.deepcopy(old), request.data)))
        except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as e:
            raise kmock.KubernetesError(422, "Invalid", f"the patch cannot be applied: {e}") from None
        if request.subresource == "status":
            new = {**old, "status": new.get("status")}
        elif self._has_status(request.resource):
            new.pop("status", None)
            if "status" in old:
                new["status"] = old["status"]
        for field in ("name", "namespace", "uid", "creationTimestamp", "generation", "deletionTimestamp"):
            if field in old["metadata"]:
                new["metadata"][field] = old["metadata"][field]
        if request.subresource is None and new.get("spec") != old.get("spec"):
            new["metadata"]["generation"] = old["metadata"].get("generation", 1) + 1
        return await self._store(request.resource, new, "MODIFIED")

    async def _delete(self, request: kmock.Request) -> dict[str, Any]:
        obj = self._current(request.resource, request.namespace, request.name)
        options = request.data if isinstance(request.data, dict) else {}
        grace = request.params.get("gracePeriodSeconds", options.get("gracePeriodSeconds"))
        meta = obj["metadata"]
        if meta.get("finalizers") or (request.resource == POD and self._terminates_slowly(obj, grace)):
            if meta.get("deletionTimestamp"):
                return obj
            meta["deletionTimestamp"] = now_text()
            if request.resource == POD:
                meta["deletionGracePeriodSeconds"] = int(grace if grace is not None else
                                                         obj["spec"].get("terminationGracePeriodSeconds", 30))
            return await self._store(request.resource, obj, "MODIFIED")
        return await self._remove(request.resource, obj)

    async def _remove(self, resource, obj: dict[str, Any]) -> dict[str, Any]:
        meta = obj["metadata"]
        self.objects[resource, meta.get("namespace"), meta["name"]].delete()
        await self._emit(resource, "DELETED", obj)
        return obj

    def _terminates_slowly(self, pod: dict[str, Any], grace: Any) -> bool:
        """A graceful delete waits for the kubelet, which a pod on a not-Ready node never hears from."""
        node = (pod.get("spec") or {}).get("nodeName")
        if grace is not None and int(grace) == 0 or not node:
            return False
        if (pod.get("status") or {}).get("phase") in ("Failed", "Succeeded"):
            return False
        return self.graceful_pods or not self.node_ready(node)

    # --- what tests and the kubelet stand-in call ------------------------------------------------------
    async def put(self, resource, obj: dict[str, Any]) -> dict[str, Any]:
        """Create an object as a client would (name or generateName, server-assigned metadata)."""
        namespace = obj.get("metadata", {}).get("namespace")
        async with self._lock:
            return await self._create(kmock.Request(resource=resource, namespace=namespace, data=obj))

    async def patch(self, resource, namespace: str | None, name: str, patch: Any,
                    status: bool = False) -> dict[str, Any]:
        """A merge patch (dict) or JSON patch (list), to `/status` with `status=True`."""
        request = kmock.Request(resource=resource, namespace=namespace, name=name, data=patch,
                                subresource="status" if status else None)
        async with self._lock:
            return await self._update(request)

    async def remove(self, resource, namespace: str | None, name: str, grace: int | None = None) -> None:
        request = kmock.Request(resource=resource, namespace=namespace, name=name,
                                params={} if grace is None else {"gracePeriodSeconds": str(grace)})
        async with self._lock:
            await self._delete(request)

    async def finish_termination(self, namespace: str, name: str) -> None:
        """The kubelet confirms a Terminating pod has stopped: the pod goes away."""
        async with self._lock:
            pod = self._current(POD, namespace, name)
            if pod["metadata"].get("deletionTimestamp"):
                await self._remove(POD, pod)

    def history(self) -> list[tuple[int, Any, dict[str, Any]]]:
        """Every watch event so far, as (resourceVersion, resource, event), oldest first."""
        return list(self._log)

    def get(self, resource, namespace: str | None, name: str) -> dict[str, Any] | None:
        key = (resource, namespace, name)
        return copy.deepcopy(self.objects[key].raw) if key in self.objects and not self.objects[key].deleted else None

    def list(self, resource, namespace: str | None = None, labels: str = "") -> list[dict[str, Any]]:
        return [copy.deepcopy(obj.raw) for (res, ns, _), obj in self.objects.items()
                if res == resource and not obj.deleted and (namespace is None or ns == namespace)
                and _matches_labels(obj.raw.get("metadata", {}).get("labels") or {}, labels)]

    def pods(self, namespace: str | None = None, labels: str = "") -> list[dict[str, Any]]:
        return self.list(POD, namespace, labels)

    def events(self, namespace: str | None = None) -> list[dict[str, Any]]:
        return self.list(EVENT, namespace)

    def node_ready(self, name: str) -> bool:
        node = self.get(NODE, None, name)
        conditions = (node or {}).get("status", {}).get("conditions") or []
        return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)

    async def add_namespace(self, name: str) -> None:
        await self.put(NAMESPACE, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})

    async def add_node(self, name: str, ready: bool = True, labels: dict[str, str] | None = None) -> None:
        node = {"apiVersion": "v1", "kind": "Node",
                "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, **(labels or {})}}}
        await self.put(NODE, node)
        await self.set_node_ready(name, ready)

    async def set_node_ready(self, name: str, ready: bool, since: datetime.datetime | None = None) -> None:
        """What the node controller reports: the Ready condition and when it last changed."""
        since = since or datetime.datetime.now(datetime.timezone.utc)
        condition = {"type": "Ready", "status": "True" if ready else "Unknown",
                     "reason": "KubeletReady" if ready else "NodeStatusUnknown",
                     "lastTransitionTime": since.strftime("%Y-%m-%dT%H:%M:%S.%fZ")}
        await self.patch(NODE, None, name, {"status": {"conditions": [condition]}}, status=True)
