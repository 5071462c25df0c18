"""`slam bench failover`: recovery time after a crash, and what checkpointing costs the decode loop.

Per context length it runs one greedy request on a fresh `slam serve` (moto S3, started here), SIGKILLs the
server after `--kill-after` tokens and measures, from the kill to the first token the client had not seen:
- restore: `--restore-slot` with the cached state (split into process start, model load, checkpoint fetch
  and resume, first step, and catch-up: regenerating tokens produced after the last checkpoint);
- re-prefill: the same with the state objects deleted, so the restore recomputes the cache from tokens;
- scratch: a server without restore and the same prompt sent again (time to its first token, then to
  regenerate the tokens already delivered).
Then decode throughput in-process with checkpoints every `--interval` tokens vs off.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass

import httpx

MODEL_ARGS = ["--max-batch", "4"]


@dataclass
class Recovery:
    mode: str  # restore | reprefill | scratch
    context: int
    killed_at: int  # tokens the client had received
    total_s: float  # kill -> first token with index >= killed_at on the new server
    process_s: float  # kill -> start of model load (python, imports)
    load_s: float
    fetch_s: float  # load_slot + resume_into (0 for scratch)
    first_step_s: float  # resume -> first new token (scratch: request -> first token)
    catchup_s: float  # the rest: tokens regenerated up to the first unseen one, delivery


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Bench:
    def __init__(self, args):
        import logging

        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per S3 request otherwise
        self.args = args
        self.s3_port = _port()
        self.moto = ThreadedMotoServer(ip_address="127.0.0.1", port=self.s3_port, verbose=False)
        self.moto.start()
        self.env = {**os.environ, "SLAM_S3_ACCESS_KEY": "bench", "SLAM_S3_SECRET_KEY": "bench",
                    "TOKENIZERS_PARALLELISM": "false", "OMP_WAIT_POLICY": "PASSIVE"}

    def start(self, prefix: str, *extra: str) -> tuple[subprocess.Popen, str, float]:
        port = _port()
        cmd = [sys.executable, "-m", "slam.cli", "serve", "--port", str(port), "--s3-endpoint",
               f"127.0.0.1:{self.s3_port}", "--s3-prefix", prefix, "--checkpoint-interval", str(self.args.interval),
               "--max-prompt-tokens", "100000", *MODEL_ARGS, *extra]
        spawned = time.time()
        proc = subprocess.Popen(cmd, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        return proc, f"http://127.0.0.1:{port}", spawned

    @staticmethod
    def wait_ready(proc: subprocess.Popen, url: str) -> dict:
        """Wait for /ready; returns the `slam-restore` timings line if the server printed one."""
        timings: dict = {}
        if "--restore-slot" in proc.args:
            for line in proc.stderr:
                if line.startswith("slam-restore "):
                    timings = json.loads(line[len("slam-restore "):])
                    break
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"slam serve exited with {proc.returncode}")
            try:
                if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                    return timings
            except httpx.HTTPError:
                pass
            time.sleep(0.05)

    def prompt(self, url: str, context: int) -> list[int]:
        from slam.eval.corpus import essays_text

        ids = httpx.post(f"{url}/tokenize", json={"prompt": essays_text()[: context * 8]}, timeout=60).json()["tokens"]
        return ids[:context]

    def generate_and_kill(self, prefix: str, context: int) -> tuple[str, list[int], float]:
        """Start a server, stream a request until `kill_after` tokens, SIGKILL it. Returns (id, prompt, t_kill)."""
        proc, url, _ = self.start(prefix, "--slot", "0")
        self.wait_ready(proc, url)
        prompt = self.prompt(url, context)
        body = {"model": httpx.get(f"{url}/v1/models").json()["data"][0]["id"], "prompt": prompt, "stream": True,
                "max_tokens": self.args.kill_after + 64, "ignore_eos": True, "temperature": 0}
        seen, rid = 0, ""
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=300) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    rid = json.loads(line[6:])["id"]
                    seen += 1
                    if seen >= self.args.kill_after:
                        break
        proc.send_signal(signal.SIGKILL)
        t_kill = time.time()
        proc.wait()
        return rid, prompt, t_kill

    def first_unseen(self, url: str, rid: str, after: int) -> float:
        with httpx.stream("GET", f"{url}/v1/requests/{rid}/stream", headers={"Last-Event-ID": str(after)},
                          timeout=300) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    return time.time()
        raise RuntimeError(f"no token after {after} for {rid}")

    def recover(self, mode: str, context: int) -> Recovery:
        prefix = f"bench-{uuid.uuid4().hex[:8]}"
        rid, prompt, t_kill = self.generate_and_kill(prefix, context)
        k = self.args.kill_after
        if mode == "reprefill":  # only prompt and tokens survive: the restore must recompute the cache
            from slam.checkpoint import ObjectStore
            from slam.config import ServerSettings

            settings = ServerSettings(s3_endpoint=f"127.0.0.1:{self.s3_port}", s3_prefix=prefix,
                                      s3_access_key="bench", s3_secret_key="bench")
            store = ObjectStore(settings.checkpoint_config())
            for name in store.list(prefix + "/"):
                if name.endswith("state.safetensors"):
                    store.delete(name)
            t_kill = time.time()  # the deletion is not part of the recovery
        if mode == "scratch":
            proc, url, _ = self.start(prefix, "--slot", "1")
        else:
            proc, url, _ = self.start(prefix, "--slot", "0", "--slot-epoch", "1", "--restore-slot", "0")
        try:
            timings = self.wait_ready(proc, url)
            if mode == "scratch":
                t_ready = time.time()  # without a restore, process start and model load are one number
                body = {"model": httpx.get(f"{url}/v1/models").json()["data"][0]["id"], "prompt": prompt,
                        "stream": True, "max_tokens": k + 1, "ignore_eos": True, "temperature": 0}
                first, n = 0.0, 0
                with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=300) as r:
                    for line in r.iter_lines():
                        if line.startswith("data: {"):
                            n += 1
                            first = first or time.time()
                            if n > k:
                                break
                t_first = time.time()
                return Recovery(mode, context, k, t_first - t_kill, t_ready - t_kill, 0.0, 0.0, first - t_ready,
                                t_first - first)
            t_first = self.first_unseen(url, rid, k - 1)
            state = httpx.get(f"{url}/v1/requests/{rid}", timeout=10).json()["restore"]
            process = timings["load_start_unix"] - t_kill
            load, fetch = timings["model_load_s"], timings["checkpoint_fetch_s"] + timings["resume_s"]
            first_step = state.get("first_step_s", 0.0)
            total = t_first - t_kill
            return Recovery(mode, context, k, total, process, load, fetch, first_step,
                            total - process - load - fetch - first_step)
        finally:
            proc.kill()
            proc.wait()

    def overhead(self, context: int) -> dict[str, float]:
        """Decode tokens/s of one request in-process, checkpointing every `interval` tokens vs not at all."""
        from slam.checkpoint import Checkpointer, ObjectStore
        from slam.config import EngineConfig, ServerSettings
        from slam.engine.engine import LLMEngine
        from slam.engine.sequence import SamplingParams
        from slam.eval.corpus import essays_text

        engine = LLMEngine(EngineConfig(max_batch=4))
        prompt = engine.encode(essays_text()[: context * 8])[:context]
        settings = ServerSettings(s3_endpoint=f"127.0.0.1:{self.s3_port}", s3_prefix=f"ovh-{uuid.uuid4().hex[:6]}",
                                  s3_access_key="bench", s3_secret_key="bench", checkpoint_interval=self.args.interval)
        ckpt = Checkpointer(ObjectStore(settings.checkpoint_config()), settings.checkpoint_config())
        out = {}
        for label, use in (("off", None), (f"interval {self.args.interval}", ckpt)):
            seq = engine.add_request(prompt, SamplingParams(max_tokens=self.args.decode_tokens + 1, ignore_eos=True))
            while not seq.output_ids:
                engine.step()
            t0 = time.perf_counter()
            while engine.has_work():
                outs = engine.step()
                if use is not None:
                    use.after_step([o.seq for o in outs])
            out[label] = self.args.decode_tokens / (time.perf_counter() - t0)
        ckpt.close(timeout=30)
        return out

    def close(self) -> None:
        self.moto.stop()


def run(args) -> int:
    bench = Bench(args)
    try:
        rows = [bench.recover(mode, c) for c in args.contexts for mode in ("restore", "reprefill", "scratch")]
        overhead = bench.overhead(args.contexts[0])
    finally:
        bench.close()
    result = {"recovery": [asdict(r) for r in rows], "decode_tokens_per_s": overhead,
              "overhead_context": args.contexts[0], "interval": args.interval, "kill_after": args.kill_after}
    if args.json:
        print(json.dumps(result))
    else:
        print_tables(result)
    return 0


def print_tables(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console() if sys.stdout.isatty() else Console(width=160)
    cols = ["mode", "context", "killed_at", "total_s", "process_s", "load_s", "fetch_s", "first_step_s", "catchup_s"]
    t = Table(title=f"slam bench failover: kill to first unseen token (checkpoint every {result['interval']} tokens)")
    for c in cols:
        t.add_column(c, justify="right")
    for r in result["recovery"]:
        t.add_row(*(f"{r[c]:.2f}" if isinstance(r[c], float) else str(r[c]) for c in cols))
    console.print(t)
    o = Table(title=f"decode throughput, one request, context {result['overhead_context']}")
    o.add_column("checkpoints")
    o.add_column("tokens/s", justify="right")
    for label, tps in result["decode_tokens_per_s"].items():
        o.add_row(label, f"{tps:.1f}")
    console.print(o)


def add_parser(sub) -> None:
    from slam.flags import positive_list

    p = sub.add_parser("failover", help="recovery time after a crash: restore vs re-prefill vs restart")
    p.add_argument("--contexts", type=positive_list(int), default=[500, 1000, 2000])
    p.add_argument("--kill-after", type=int, default=24, help="tokens received before the kill")
    p.add_argument("--interval", type=int, default=16, help="--checkpoint-interval of the servers")
    p.add_argument("--decode-tokens", type=int, default=64, help="tokens timed for the overhead comparison")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)
