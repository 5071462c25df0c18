"""The few Kubernetes API calls the handlers make, with the official client off the event loop.

The client is synchronous, so each call runs in a worker thread (`asyncio.to_thread`); the handlers stay
async, which they must be to read kopf's indices safely. Bodies come back as plain dicts (no model
classes): the handlers only read a few fields.
"""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import kubernetes
from kubernetes.client.exceptions import ApiException

from slam_operator.pods import selector_text


def load_configuration() -> kubernetes.client.Configuration:
    """In-cluster credentials when running in a pod, else the current kubeconfig context."""
    configuration = kubernetes.client.Configuration()
    try:
        kubernetes.config.load_incluster_config(client_configuration=configuration)
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config(client_configuration=configuration)
    return configuration


def _json(response: Any) -> dict[str, Any]:
    return json.loads(response.data or b"{}")


class Kube:
    def __init__(self, configuration: kubernetes.client.Configuration):
        self.client = kubernetes.client.ApiClient(configuration)
        self.core = kubernetes.client.CoreV1Api(self.client)

    def close(self) -> None:
        self.client.close()

    async def create_pod(self, namespace: str, manifest: dict[str, Any]) -> dict[str, Any]:
        return _json(await asyncio.to_thread(
            self.core.create_namespaced_pod, namespace, manifest, _preload_content=False))

    async def delete_pod(self, namespace: str, name: str, force: bool) -> bool:
        """Delete a pod; `force` means grace period 0 (for a dead node, whose kubelet cannot confirm).
        False if it was already gone."""
        options: dict[str, Any] = {"propagationPolicy": "Background"}
        if force:
            options["gracePeriodSeconds"] = 0
        try:
            await asyncio.to_thread(self.core.delete_namespaced_pod, name, namespace, body=options,
                                    _preload_content=False)
        except ApiException as e:
            if e.status == 404:
                return False
            raise
        return True

    async def list_pods(self, namespace: str, instance: str) -> list[dict[str, Any]]:
        response = await asyncio.to_thread(self.core.list_namespaced_pod, namespace,
                                           label_selector=selector_text(instance), _preload_content=False)
        return _json(response).get("items", [])

    async def apply_service(self, namespace: str, manifest: dict[str, Any]) -> None:
        """Create the Service, or bring an existing one's spec to the manifest's."""
        try:
            await asyncio.to_thread(self.core.create_namespaced_service, namespace, manifest, _preload_content=False)
        except ApiException as e:
            if e.status != 409:
                raise
            changes = {"metadata": {"labels": manifest["metadata"]["labels"],
                                    "ownerReferences": manifest["metadata"].get("ownerReferences")},
                       "spec": {k: manifest["spec"][k] for k in ("selector", "ports")}}
            await asyncio.to_thread(self.core.patch_namespaced_service, manifest["metadata"]["name"], namespace,
                                    changes, _preload_content=False)

    async def delete_service(self, namespace: str, name: str) -> None:
        try:
            await asyncio.to_thread(self.core.delete_namespaced_service, name, namespace, _preload_content=False)
        except ApiException as e:
            if e.status != 404:
                raise

    async def secret_value(self, namespace: str, name: str, key: str) -> str:
        secret = _json(await asyncio.to_thread(self.core.read_namespaced_secret, name, namespace,
                                               _preload_content=False))
        if key in (secret.get("stringData") or {}):
            return secret["stringData"][key]
        data = (secret.get("data") or {}).get(key)
        if data is None:
            raise KeyError(f"secret {namespace}/{name} has no key {key!r}")
        return base64.b64decode(data).decode()
