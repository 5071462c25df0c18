"""A kubelet stand-in that runs real servers: every pod bound to one of the emulator's nodes runs as a local
`slam serve` process with the pod's rendered command and environment (design.md section 4).

`Kubelet` (tests/kube_fixtures.py) plays the scheduler and reports phases; `ProcessKubelet` adds:
- the pod's server container as a process: its command (`slam` runs as `python -m slam.cli`) and env
  (`Kubelet.container_env`, Secrets resolved); the in-cluster host, port and advertise URL become a free
  loopback port, the S3 endpoint the test's (moto);
- phases: Running at once, Ready once the server's /ready answers 200, Failed with the exit code when the
  process dies; a pod deleted from the API has its process killed, as a kubelet would;
- failures on demand: `kill` a pod's process (SIGKILL); `node_down` marks a node NotReady and kills its
  processes (a dead node) or freezes them (SIGSTOP: a partitioned node, which `thaw` lets run on, unseen
  by the cluster); nothing on a down node is reported any more;
- the clients' Service: `service_urls()` are the addresses of the ready pods, `url_of(slot)` the one of a slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from kube_fixtures import POD, Kubelet
from s3_fixtures import free_port

SLOT_LABEL, EPOCH_LABEL = "slam.dev/slot", "slam.dev/epoch"


@dataclass
class Server:
    namespace: str
    name: str
    uid: str
    slot: int
    epoch: int
    node: str
    url: str
    proc: subprocess.Popen
    ready: bool = False


def base_env() -> dict[str, str]:
    """This process's environment without its SLAM_* settings (the pod's are the only ones that count)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLAM_") or k == "SLAM_HOME"}
    env.setdefault("SLAM_HOME", str(Path.home() / ".cache" / "slam"))
    return {**env, "TOKENIZERS_PARALLELISM": "false", "OMP_WAIT_POLICY": "PASSIVE"}


def command(container: dict[str, Any]) -> list[str]:
    cmd = [*container.get("command", []), *container.get("args", [])]
    return [sys.executable, "-m", "slam.cli", *cmd[1:]] if cmd and cmd[0] == "slam" else cmd


class ProcessKubelet(Kubelet):
    def __init__(self, k8s: Any, s3_endpoint: str, logs: Path, period: float = 0.1):
        super().__init__(k8s, period=period, ready_pods=False)
        self.s3_endpoint, self.logs = s3_endpoint, logs
        self.servers: dict[str, Server] = {}  # by pod uid: the pods this kubelet still reports on
        self.orphans: list[Server] = []  # processes on down nodes, whatever became of their pods
        self.down: set[str] = set()
        self._http = httpx.AsyncClient(timeout=1.0)

    async def __aexit__(self, *exc: Any) -> None:
        await super().__aexit__(*exc)
        await self._http.aclose()
        for server in [*self.servers.values(), *self.orphans]:
            if server.proc.poll() is None:
                server.proc.kill()  # SIGKILL ends a stopped process too
            server.proc.wait()

    # --- kubelet -----------------------------------------------------------------------------------------
    async def start_pod(self, pod: dict[str, Any]) -> None:
        meta, container = pod["metadata"], pod["spec"]["containers"][0]
        try:
            env = {**base_env(), **self.container_env(pod)}
        except KeyError:
            return  # a Secret is missing: the pod stays Pending, as with a real kubelet
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        env.update(SLAM_HOST="127.0.0.1", SLAM_PORT=str(port), SLAM_ADVERTISE_URL=url,
                   SLAM_S3_ENDPOINT=self.s3_endpoint)
        with open(self.logs / f"{meta['name']}.log", "wb") as out:
            proc = subprocess.Popen(command(container), env=env, stdout=out, stderr=subprocess.STDOUT)
        labels = meta["labels"]
        self.servers[meta["uid"]] = Server(meta["namespace"], meta["name"], meta["uid"], int(labels[SLOT_LABEL]),
                                           int(labels[EPOCH_LABEL]), pod["spec"]["nodeName"], url, proc)
        await self.set_phase(pod, "Running", ready=False)

    async def stop_pod(self, pod: dict[str, Any]) -> None:
        """A graceful delete: SIGTERM, and the server checkpoints its requests before it exits."""
        server = self.servers.pop(pod["metadata"]["uid"], None)
        if server is None or server.proc.poll() is not None:
            return
        server.proc.terminate()
        for _ in range(600):
            if server.proc.poll() is not None:
                return
            await asyncio.sleep(0.1)
        server.proc.kill()

    async def step(self) -> None:
        await super().step()
        for server in list(self.servers.values()):
            await self._watch(server)

    async def _watch(self, server: Server) -> None:
        pod = self.k8s.get(POD, server.namespace, server.name)
        if pod is None or pod["metadata"]["uid"] != server.uid:  # deleted: its containers go with it
            del self.servers[server.uid]
            if server.proc.poll() is None:
                server.proc.kill()
            return
        code = server.proc.poll()
        if code is not None:
            del self.servers[server.uid]
            await self.set_phase(pod, "Failed", exit_code=128 - code if code < 0 else code)
        elif not server.ready:
            with contextlib.suppress(httpx.HTTPError):
                server.ready = (await self._http.get(f"{server.url}/ready")).status_code == 200
            if server.ready:
                await self.set_phase(pod, "Running", ready=True)

    # --- failures ----------------------------------------------------------------------------------------
    def server_of(self, pod_name: str) -> Server:
        return next(s for s in self.servers.values() if s.name == pod_name)

    def kill(self, pod_name: str) -> None:
        self.server_of(pod_name).proc.send_signal(signal.SIGKILL)

    async def node_down(self, node: str, freeze: bool = False) -> list[Server]:
        """The node stops reporting (NotReady); its servers die, or with `freeze` stall until `thaw`."""
        self.down.add(node)
        gone = [s for s in self.servers.values() if s.node == node]
        for server in gone:
            del self.servers[server.uid]
            server.proc.send_signal(signal.SIGSTOP if freeze else signal.SIGKILL)
        self.orphans += gone
        await self.k8s.set_node_ready(node, False)
        return gone

    def thaw(self, node: str) -> None:
        for server in self.orphans:
            if server.node == node and server.proc.poll() is None:
                server.proc.send_signal(signal.SIGCONT)

    # --- the Service -------------------------------------------------------------------------------------
    def service_urls(self) -> list[str]:
        """Addresses of the pods a Service would send clients to (Ready, not Terminating), by slot."""
        ready = []
        for server in self.servers.values():
            pod = self.k8s.get(POD, server.namespace, server.name) or {}
            conditions = (pod.get("status") or {}).get("conditions") or []
            if not pod.get("metadata", {}).get("deletionTimestamp") and server.proc.poll() is None and any(
                    c["type"] == "Ready" and c["status"] == "True" for c in conditions):
                ready.append(server)
        return [s.url for s in sorted(ready, key=lambda s: s.slot)]

    def url_of(self, slot: int) -> str | None:
        urls = {s.url: s for s in self.servers.values() if s.slot == slot}
        return next((u for u in self.service_urls() if u in urls), None)
