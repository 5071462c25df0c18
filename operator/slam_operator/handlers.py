"""kopf handlers of the SLAMInference operator, registered into a registry by `register()`.

Each operator (and each test) gets its own registry, so settings such as the reconcile interval are
plain arguments rather than import-time constants. Every handler is async: kopf's indices are read from
the event loop only.
"""

from __future__ import annotations

import dataclasses
import datetime
from typing import Any

import kopf
import kubernetes

from slam_operator import cleanup
from slam_operator import pods as render
from slam_operator.kube import Kube
from slam_operator.reconcile import node_view, pod_view, reconcile, state_of
from slam_operator.spec import SpecError, parse_spec
from slam_operator.status import changes, failed_status

GROUP, VERSION, PLURAL = "slam.dev", "v1alpha1", "slaminferences"
FINALIZER = "slam.dev/cleanup"


@dataclasses.dataclass
class OperatorConfig:
    kube: kubernetes.client.Configuration  # also what kopf logs in with
    reconcile_seconds: float = 2.0  # the timer: how soon a failure or a spec change is acted upon
    cleanup_poll_seconds: float = 2.0  # how often deletion checks whether the pods are gone


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _connection(configuration: kubernetes.client.Configuration) -> kopf.ConnectionInfo:
    if configuration.refresh_api_key_hook is not None:  # in-cluster: re-read the rotated service account token
        configuration.refresh_api_key_hook(configuration)
    token = (configuration.api_key or {}).get("authorization") or (configuration.api_key or {}).get("BearerToken")
    scheme, _, value = (token or "").partition(" ")
    return kopf.ConnectionInfo(
        server=configuration.host, ca_path=configuration.ssl_ca_cert, insecure=not configuration.verify_ssl,
        token=value or scheme or None, scheme="Bearer" if token else None,
        certificate_path=configuration.cert_file, private_key_path=configuration.key_file,
    )


def _instance_pods(index: kopf.Index, namespace: str, name: str) -> list:
    return list(index.get((namespace, name), []))


def _nodes(index: kopf.Index) -> dict:
    return {name: next(iter(store)) for name, store in index.items() if store}


def register(registry: kopf.OperatorRegistry, config: OperatorConfig) -> None:
    kube = Kube(config.kube)
    resource = dict(group=GROUP, version=VERSION, plural=PLURAL, registry=registry)

    @kopf.on.startup(registry=registry, id="configure")
    async def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.persistence.finalizer = FINALIZER
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="slam.dev")
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
            prefix="slam.dev", key="last-handled-configuration")

    @kopf.on.login(registry=registry, id="login")
    async def login(**_: Any) -> kopf.ConnectionInfo:
        return _connection(config.kube)

    @kopf.on.cleanup(registry=registry, id="close")
    async def close(**_: Any) -> None:
        kube.close()

    @kopf.index("pods", labels={render.NAME_LABEL: "slam"}, registry=registry, id="slam_pods")
    async def slam_pods(body: kopf.Body, namespace: str, labels: kopf.Labels, **_: Any) -> dict | None:
        view = pod_view(body)
        return {(namespace, labels.get(render.INSTANCE_LABEL)): view} if view else None

    @kopf.index("nodes", registry=registry, id="slam_nodes")
    async def slam_nodes(name: str, status: kopf.Status, **_: Any) -> dict:
        return {name: node_view(status)}

    @kopf.on.event("pods", labels={render.NAME_LABEL: "slam"}, registry=registry, id="pod_event")
    async def pod_event(body: kopf.Body, type: str | None, memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
        # The cause of a pod's end (OOMKilled, Error, Evicted...) goes to its owner's Events at once; the
        # reconcile timer replaces the pod.
        view = pod_view(body)
        if view is None or view.phase == memo.get("phase") or view.phase not in ("Failed", "Succeeded"):
            memo["phase"] = view.phase if view else None
            return
        memo["phase"] = view.phase
        owner = next((o for o in body.metadata.get("ownerReferences") or [] if o.get("kind") == "SLAMInference"), None)
        if owner is None:
            return
        terminated = [c.get("state", {}).get("terminated") or {} for c in body.status.get("containerStatuses") or []]
        detail = "; ".join(f"{t.get('reason', 'exited')} (exit code {t.get('exitCode')})" for t in terminated if t)
        message = f"slot {view.slot}: pod {view.name} {view.phase}: {view.reason or detail or 'no reason given'}"
        target = {"apiVersion": owner["apiVersion"], "kind": owner["kind"], "metadata": {
            "name": owner["name"], "uid": owner["uid"], "namespace": body.metadata.namespace}}
        reason = "Evicted" if view.reason == "Evicted" else "PodFailed"
        kopf.event(target, type="Warning", reason=reason, message=message)
        logger.warning(message)

    @kopf.on.event("nodes", registry=registry, id="node_event")
    async def node_event(name: str, status: kopf.Status, memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
        ready = node_view(status).ready
        if memo.get("ready", True) != ready:
            logger.warning(f"node {name} is {'Ready' if ready else 'not Ready'}")
        memo["ready"] = ready

    def spec_or_fail(spec: Any, meta: Any, status: Any, patch: kopf.Patch):
        try:
            return parse_spec(spec)
        except SpecError as e:
            patch.status.update(changes(status, failed_status(str(e), meta.get("generation"), status, _now())))
            raise

    @kopf.on.resume(**resource, id="apply")
    @kopf.on.create(**resource, id="apply")
    @kopf.on.update(**resource, id="apply")
    async def apply(body: kopf.Body, spec: kopf.Spec, meta: kopf.Meta, status: kopf.Status, patch: kopf.Patch,
                    memo: kopf.Memo, logger: kopf.Logger, slam_pods: kopf.Index, slam_nodes: kopf.Index,
                    **_: Any) -> None:
        try:
            parsed = spec_or_fail(spec, meta, status, patch)
        except SpecError as e:
            kopf.event(body, type="Warning", reason="InvalidSpec", message=str(e))
            raise kopf.PermanentError(str(e)) from None
        await reconcile(kube, body, parsed, _instance_pods(slam_pods, meta.namespace, meta.name),
                        _nodes(slam_nodes), memo, patch, logger)

    @kopf.timer(**resource, interval=config.reconcile_seconds, id="reconcile")
    async def periodic(body: kopf.Body, spec: kopf.Spec, meta: kopf.Meta, status: kopf.Status, patch: kopf.Patch,
                       memo: kopf.Memo, logger: kopf.Logger, slam_pods: kopf.Index, slam_nodes: kopf.Index,
                       **_: Any) -> None:
        if meta.get("deletionTimestamp"):
            return
        try:
            parsed = spec_or_fail(spec, meta, status, patch)
        except SpecError:
            return  # reported by `apply` (PermanentError); nothing to do until the spec changes
        await reconcile(kube, body, parsed, _instance_pods(slam_pods, meta.namespace, meta.name),
                        _nodes(slam_nodes), memo, patch, logger)

    @kopf.on.delete(**resource, id="delete")
    async def delete(body: kopf.Body, spec: kopf.Spec, meta: kopf.Meta, status: kopf.Status, patch: kopf.Patch,
                     memo: kopf.Memo, logger: kopf.Logger, slam_nodes: kopf.Index, **_: Any) -> None:
        patch.status["phase"] = "Terminating"
        await cleanup.finalize(kube, body, spec, status, _nodes(slam_nodes), state_of(memo).lock,
                               config.cleanup_poll_seconds)
        logger.info(f"cleaned up the pods and services of {meta.namespace}/{meta.name}")
