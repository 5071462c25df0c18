"""Prometheus metrics in the server's own registry (so tests can run several servers in one process).

Gauges of the scheduler's queues are read at scrape time; everything else is recorded by the engine loop.
GPU series exist only when NVML initializes and sees a device: absent is more honest than zero.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

log = logging.getLogger("slam.api")

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)


class GPUCollector:
    """Utilization and memory of each GPU through nvidia-ml-py, if there is one."""

    def __init__(self) -> None:
        self.handles: list = []
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nvml = pynvml
            self.handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        except Exception as exc:  # no driver, no library, no device: the series are simply absent
            log.debug("NVML unavailable: %s", exc)

    def collect(self):
        if not self.handles:
            return
        util = GaugeMetricFamily("slam:gpu_utilization_ratio", "GPU utilization (0-1)", labels=["gpu"])
        used = GaugeMetricFamily("slam:gpu_memory_used_bytes", "GPU memory in use", labels=["gpu"])
        total = GaugeMetricFamily("slam:gpu_memory_total_bytes", "GPU memory in total", labels=["gpu"])
        for i, handle in enumerate(self.handles):
            try:
                rates = self.nvml.nvmlDeviceGetUtilizationRates(handle)
                mem = self.nvml.nvmlDeviceGetMemoryInfo(handle)
            except Exception:
                continue
            util.add_metric([str(i)], rates.gpu / 100.0)
            used.add_metric([str(i)], float(mem.used))
            total.add_metric([str(i)], float(mem.total))
        yield from (util, used, total)


class Metrics:
    def __init__(self, running: Callable[[], int], waiting: Callable[[], int]):
        r = self.registry = CollectorRegistry()
        Gauge("slam:num_requests_running", "Requests in the running batch", registry=r).set_function(running)
        Gauge("slam:num_requests_waiting", "Requests waiting for a batch slot", registry=r).set_function(waiting)
        self.ttft = Histogram("slam:time_to_first_token_seconds", "Arrival to first generated token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("slam:inter_token_latency_seconds", "Time between consecutive tokens of a request",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("slam:e2e_request_latency_seconds", "Arrival to last token",
                             buckets=E2E_BUCKETS, registry=r)
        self.prompt_tokens = Counter("slam:prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.generation_tokens = Counter("slam:generation_tokens", "Generated tokens", registry=r)
        self.kv_cache_bytes = Gauge("slam:kv_cache_bytes", "Bytes of keys and values in the active caches", registry=r)
        self.kv_budget_ratio = Gauge(
            "slam:kv_cache_budget_usage_ratio",
            "Active cache tokens over the budgets of the running bounded-cache requests", registry=r)
        self.replacements = Counter("slam:cache_replacements", "Query-aware recalls into active caches", registry=r)
        self.success = Counter("slam:request_success", "Finished requests", ["finished_reason"], registry=r)
        self.aborted = Counter("slam:request_aborted", "Requests aborted (client gone)", registry=r)
        self.rejected = Counter("slam:request_rejected", "Requests refused because the queue was full", registry=r)
        self.failed = Counter("slam:request_failure", "Requests that failed inside the engine", registry=r)
        self.steps = Counter("slam:engine_steps", "Engine steps run", registry=r)
        self.steps_ahead = Counter("slam:engine_steps_ahead", "Decode steps launched before the previous step was "
                                   "postprocessed (async scheduling)", registry=r)
        r.register(GPUCollector())

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def token_timing(self, arrival: float, last_token: float | None, now: float) -> float:
        """Record time to first token or between tokens; returns `now`, the request's new last-token time."""
        if last_token is None:
            self.ttft.observe(now - arrival)
        else:
            self.itl.observe(now - last_token)
        return now

    def cache_gauges(self, running: list) -> None:
        running = [s for s in running if s.slot is not None]
        self.kv_cache_bytes.set(sum(s.cache_bytes() for s in running))
        bounded = [s for s in running if s.cache_config.bounded]
        budget = sum(s.policy.budget for s in bounded)
        self.kv_budget_ratio.set(sum(s.cache_tokens() for s in bounded) / budget if budget else 0.0)
