"""Failover on a real cluster made by e2e/kind-up.sh: a client streams a completion from one server pod, the
pod (or its whole node) goes away, and the client resumes through the Service with Last-Event-ID. Every token
index arrives exactly once and the text equals an uninterrupted run on the same settings.

    e2e/kind-up.sh && pytest e2e/ -v; e2e/kind-down.sh

Skipped (with the reason) where docker, kind or kubectl are missing or the cluster is not up.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator

import httpx
import pytest

CLUSTER = os.environ.get("SLAM_KIND_CLUSTER", "slam-e2e")
NAME, NAMESPACE = "smollm2", "default"  # manifests/examples/slaminference.yaml
PROMPT = "Write a long story about a lighthouse keeper and the sea."
MAX_TOKENS, CUT_AT = 160, 48  # the example checkpoints every 16 tokens
RECOVERY_S = 420  # node NotReady (~40 s) + the example's 30 s grace + a new pod restoring


def _missing() -> str | None:
    for tool in ("docker", "kind", "kubectl"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if subprocess.run(["docker", "info"], check=False, capture_output=True).returncode != 0:
        return "the docker daemon does not answer"
    clusters = subprocess.run(["kind", "get", "clusters"], check=False, capture_output=True, text=True).stdout.split()
    if CLUSTER not in clusters:
        return f"no kind cluster {CLUSTER!r}: run e2e/kind-up.sh first"
    return None


if (reason := _missing()) is not None:
    pytest.skip(reason, allow_module_level=True)


def kubectl(*args: str) -> str:
    cmd = ["kubectl", "--context", f"kind-{CLUSTER}", "-n", NAMESPACE, *args]
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout


def ready_server_pods() -> list[dict]:
    pods = json.loads(kubectl("get", "pods", "-l", f"app.kubernetes.io/name=slam,app.kubernetes.io/instance={NAME}",
                              "-o", "json"))["items"]
    return [p for p in pods if p["metadata"].get("deletionTimestamp") is None and any(
        c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions", []))]


def status() -> dict:
    return json.loads(kubectl("get", "slaminference", NAME, "-o", "json")).get("status", {})


@contextlib.contextmanager
def port_forward(target: str) -> Iterator[str]:
    """`kubectl port-forward` to a pod or to the Service; yields the local URL once it accepts connections."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(["kubectl", "--context", f"kind-{CLUSTER}", "-n", NAMESPACE, "port-forward", target,
                             f"{port}:http"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise ConnectionError(f"port-forward {target} ended: {proc.stderr.read()}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            if time.monotonic() > deadline:
                raise ConnectionError(f"port-forward {target} did not open")
            time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def sse(response: httpx.Response) -> Iterator[tuple[int | None, str]]:
    """(id, data) of each server-sent event, until `data: [DONE]`."""
    event_id, data = None, []
    for line in response.iter_lines():
        if line.startswith("id:"):
            event_id = int(line[3:].strip())
        elif line.startswith("data:"):
            data.append(line[5:].strip())
        elif not line and data:
            if data == ["[DONE]"]:
                return
            yield event_id, "\n".join(data)
            event_id, data = None, []


def completion(stream: bool) -> dict:
    return {"model": "SmolLM2-135M-Instruct", "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0,
            "stream": stream}


def reference(url: str) -> tuple[list[int], str]:
    """Token ids and text of the same request, uninterrupted."""
    body = httpx.post(f"{url}/v1/completions", json=completion(False), timeout=300).json()
    ids = httpx.get(f"{url}/v1/requests/{body['id']}", timeout=30).json()["output_ids"]
    return ids, body["choices"][0]["text"]


def stream_until_cut(url: str, cut: Callable[[], None]) -> tuple[str, dict[int, str]]:
    """Stream the completion; after CUT_AT tokens run `cut`, and keep reading until the stream breaks (hanging
    up ourselves would abort the request on a live server)."""
    received: dict[int, str] = {}
    request_id = ""
    with contextlib.suppress(httpx.HTTPError), httpx.stream(
            "POST", f"{url}/v1/completions", json=completion(True), timeout=httpx.Timeout(30, read=20)) as r:
        for index, data in sse(r):
            chunk = json.loads(data)
            request_id = chunk["id"]
            assert index not in received, f"token {index} twice on the first stream"
            received[index] = chunk["choices"][0]["text"]
            if len(received) == CUT_AT:
                cut()
    assert len(received) >= CUT_AT and request_id
    return request_id, received


def resume(request_id: str, received: dict[int, str]) -> int:
    """Resume through the Service until the request is done; returns how many resumes delivered tokens."""
    deadline, delivered = time.monotonic() + RECOVERY_S, 0
    while len(received) < MAX_TOKENS and time.monotonic() < deadline:
        last = max(received)
        try:
            with port_forward(f"svc/{NAME}") as url, httpx.stream(
                    "GET", f"{url}/v1/requests/{request_id}/stream", headers={"Last-Event-ID": str(last)},
                    timeout=httpx.Timeout(30, read=60)) as r:
                if r.status_code != 200:  # not restored yet (404), owner not up (502), draining (503)
                    raise ConnectionError(f"resume answered {r.status_code}")
                got, finished = 0, False
                for index, data in sse(r):
                    event = json.loads(data)
                    assert index == max(received) + 1, f"resume sent {index} after {max(received)}"
                    received[index] = event["text"]
                    got += 1
                    finished = event["finish_reason"] is not None
                delivered += got > 0
                if finished:
                    return delivered
        except (httpx.HTTPError, ConnectionError, subprocess.CalledProcessError):
            time.sleep(3)
    return delivered


def check_failover(cut_pod: Callable[[dict], None]) -> None:
    pods = [p for p in ready_server_pods() if "control-plane" not in p["spec"]["nodeName"]]
    assert pods, "no ready server pod on a worker"
    victim = pods[0]
    slot, epoch = victim["metadata"]["labels"]["slam.dev/slot"], int(victim["metadata"]["labels"]["slam.dev/epoch"])
    failovers = status().get("failovers", 0)
    with port_forward(f"pod/{victim['metadata']['name']}") as url:
        ref_ids, ref_text = reference(url)
        request_id, received = stream_until_cut(url, lambda: cut_pod(victim))
    assert resume(request_id, received) == 1, "the stream resumed more than once, or never"
    assert sorted(received) == list(range(len(ref_ids))), "a token index was lost"
    assert "".join(received[i] for i in sorted(received)) == ref_text
    with port_forward(f"svc/{NAME}") as url:
        assert httpx.get(f"{url}/v1/requests/{request_id}", timeout=30).json()["output_ids"] == ref_ids
    # The operator replaced the slot at a higher epoch and counted the failover (status may trail a little).
    assert eventually(lambda: any(int(p["metadata"]["labels"]["slam.dev/epoch"]) > epoch for p in ready_server_pods()
                                  if p["metadata"]["labels"]["slam.dev/slot"] == slot)), "slot not replaced"
    assert eventually(lambda: status().get("failovers", 0) > failovers), "status.failovers did not grow"


def eventually(check: Callable[[], bool], timeout: float = 60) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(2)
    return True


@pytest.mark.timeout(900)
def test_deleted_pod_resumes_exactly_once():
    check_failover(lambda pod: kubectl("delete", "pod", pod["metadata"]["name"], "--wait=false"))


@pytest.mark.timeout(900)
def test_stopped_node_resumes_exactly_once():
    stopped: list[str] = []

    def stop_node(pod: dict) -> None:
        # A kind node is a docker container of that name. No stop timeout: the node dies at once, like a crash,
        # so the new pod restores from the last periodic checkpoint, not from a shutdown checkpoint.
        stopped.append(pod["spec"]["nodeName"])
        subprocess.run(["docker", "stop", "--time", "0", stopped[0]], check=True, capture_output=True)

    try:
        check_failover(stop_node)
    finally:
        for node in stopped:
            subprocess.run(["docker", "start", node], check=True, capture_output=True)
            kubectl("wait", f"node/{node}", "--for=condition=Ready", "--timeout=300s")
