"""Finding a slot's checkpoints, verifying them, and putting the requests back into an engine.

For each request the newest manifest whose every object verifies (size and sha256) wins. Failing that,
any version whose prompt and tokens verify gives a re-prefill: the engine recomputes the cache from
prompt + generated tokens, with the generated tokens kept as already-emitted output and the RNG state
restored. With neither, the request is reported lost: never silently wrong.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from slam.checkpoint import format as fmt
from slam.checkpoint.store import ObjectMissing, ObjectStore
from slam.config import CacheConfig
from slam.engine.sequence import SamplingParams, Sequence

log = logging.getLogger(__name__)
MANIFEST_RE = re.compile(r"^v(\d{8})/manifest\.json$")


class CorruptObject(ValueError):
    """An object is missing, has the wrong size or checksum, or does not decode."""


@dataclass
class RestoredRequest:
    request_id: str
    status: str  # "exact": cache restored; "reprefill": tokens only; "lost": nothing usable
    reason: str = ""  # why it is not exact from the newest version ("" when it is)
    version: int | None = None  # the version used
    latest_version: int = 0  # highest version number present: new checkpoints must go above it
    versions: list[int] = field(default_factory=list)  # versions whose manifest exists
    owner_url: str = ""
    prompt_ids: list[int] = field(default_factory=list)
    output_ids: list[int] = field(default_factory=list)  # already emitted to the client
    rng_state: torch.Tensor | None = None
    sampling: dict = field(default_factory=dict)
    cache_config: dict = field(default_factory=dict)
    detok: dict = field(default_factory=dict)
    replacements: int = 0
    num_cached: int = 0
    layers: list[tuple[torch.Tensor, ...]] | None = None  # per layer (k, v, pos, score)
    reserve: list[dict[str, Any]] | None = None  # per layer k, v, k_score (None: shared), pos, n
    reserve_next_pos: int | None = None
    manifest: dict | None = None

    def store_state(self) -> dict[str, Any]:
        """Keyword arguments for Checkpointer.adopt: go on numbering, reuse stored prompt and segments."""
        m = self.manifest or {}
        exact = self.status == "exact" and self.reserve is not None
        segments = m.get("objects", {}).get("segments", []) if exact else []
        return {
            "version": self.latest_version,
            "versions": [v for v in self.versions if v <= self.latest_version],
            "prompt": m.get("objects", {}).get("prompt"),
            "segments": list(segments),
            "stored": segments[-1]["ends"] if segments else None,
            "last_tokens": len(self.output_ids),
        }


def latest_epoch(store: ObjectStore, slot: int, prefix: str | None = None) -> int | None:
    """The highest epoch of `slot` that was claimed (its marker exists); None when none was.

    An epoch whose pod died before claiming it never served anything, so the one below it still holds
    the slot's requests; every epoch below the highest claimed one is stale, however recent its objects.
    """
    base = fmt.slot_dir(store.config.prefix if prefix is None else prefix, slot)
    epochs = sorted((e for d in store.list_dirs(base) if (e := fmt.dir_number(d)) is not None), reverse=True)
    for epoch in epochs:
        try:
            store.get(f"{base}{epoch}/{fmt.EPOCH_MARKER}")
        except ObjectMissing:
            continue
        return epoch
    return None


def load_slot(store: ObjectStore, slot: int, prefix: str | None = None, epoch: int | None = None
              ) -> list[RestoredRequest]:
    """Every request checkpointed in `slot` at `epoch` (default: the highest claimed one), each restored as
    well as its objects allow."""
    prefix = store.config.prefix if prefix is None else prefix
    if epoch is None:
        epoch = latest_epoch(store, slot, prefix)
        if epoch is None:
            return []
    base = fmt.epoch_dir(prefix, slot, epoch)
    by_request: dict[str, list[int]] = {}
    finished: set[str] = set()
    for name in store.list(base):
        rid, slash, rest = name[len(base) :].partition("/")
        if not slash:  # the epoch's own marker
            continue
        match = MANIFEST_RE.match(rest)
        by_request.setdefault(rid, [])
        if match:
            by_request[rid].append(int(match.group(1)))
        elif rest == fmt.FINISHED:
            finished.add(rid)  # done before the crash; what is left of it is being deleted
    return [load_request(store, base + rid + "/", rid, sorted(vs, reverse=True))
            for rid, vs in sorted(by_request.items()) if rid not in finished]


def load_request(store: ObjectStore, root: str, rid: str, versions: list[int]) -> RestoredRequest:
    """`versions`: manifest versions present, newest first."""
    blobs: dict[str, bytes] = {}
    reasons: list[str] = []

    def fetch(entry: dict | None) -> bytes:
        if entry is None:
            raise CorruptObject("object not recorded")
        name = entry["name"]
        if name not in blobs:
            try:
                blobs[name] = store.get(root + name)
            except ObjectMissing as e:
                raise CorruptObject(f"{name} missing") from e
        data = blobs[name]
        if len(data) != entry["size"] or fmt.sha256(data) != entry["sha256"]:
            raise CorruptObject(f"{name} fails its checksum")
        return data

    manifests = []
    for v in versions:
        try:
            m = fmt.decode_manifest(store.get(root + fmt.version_dir(v) + fmt.MANIFEST))
            if m.get("request_id") != rid or m.get("version") != v:
                raise ValueError("manifest names another request or version")
            manifests.append(m)
        except (ValueError, ObjectMissing) as e:
            reasons.append(f"v{v} manifest: {e}")
    base = RestoredRequest(rid, "lost", latest_version=max(versions, default=0), versions=sorted(versions))
    # Newest first with the full state, then tokens only (re-prefill) from the newest readable version.
    for with_cache, part in ((True, "state"), (False, "tokens")):
        for m in manifests:
            try:
                out = _decode(base, m, fetch, with_cache=with_cache)
                out.reason = "; ".join(reasons)
                return out
            except (CorruptObject, ValueError, KeyError) as e:
                reasons.append(f"v{m['version']} {part}: {e}")
    base.reason = "; ".join(reasons) or "no complete checkpoint"
    log.error("request %s lost: %s", rid, base.reason)
    return base


def _decode(base: RestoredRequest, m: dict, fetch, with_cache: bool) -> RestoredRequest:
    objs = m["objects"]
    prompt = fmt.load(fetch(objs["prompt"]))["prompt_ids"].tolist()
    tokens = fmt.load(fetch(objs["tokens"]))
    out = RestoredRequest(
        base.request_id,
        "reprefill",
        version=m["version"],
        latest_version=base.latest_version,
        versions=base.versions,
        owner_url=m.get("owner_url", ""),
        prompt_ids=prompt,
        output_ids=tokens["output_ids"].tolist(),
        rng_state=tokens["rng_state"],
        sampling=m["sampling"],
        cache_config=m["cache_config"],
        detok=m["detok"],
        replacements=m.get("replacements", 0),
        reserve_next_pos=m.get("reserve_next_pos"),
        manifest=m,
    )
    if len(out.prompt_ids) != m["counts"]["prompt_tokens"] or len(out.output_ids) != m["counts"]["output_tokens"]:
        raise CorruptObject("token counts disagree with the manifest")
    if not with_cache:
        return out
    out.status = "exact"
    if objs["state"] is None:
        return out  # checkpointed before its first forward pass: starting over is exact
    layers = len(m["counts"]["cache_tokens"])
    st = fmt.load(fetch(objs["state"]))
    k, v, pos, score = (fmt.unpack_layers(n, st, layers) for n in ("k", "v", "pos", "score"))
    out.layers = list(zip(k, v, pos, score))
    out.num_cached = m["counts"]["num_cached"]
    if m.get("reserve") is not None:
        out.reserve = _decode_reserve(m["reserve"], objs["segments"], fetch, layers, k[0].dtype)
    return out


def _decode_reserve(info: dict, segments: list[dict], fetch, layers: int, dtype: torch.dtype) -> list[dict]:
    """Concatenate every segment, checking that they tile [0, n) of each layer."""
    parts: list[dict[str, list[torch.Tensor]]] = [{"k": [], "v": [], "k_score": [], "pos": []} for _ in range(layers)]
    have = [0] * layers
    for seg in segments:
        t = fmt.load(fetch(seg))
        firsts = t["first"].tolist()
        ends = seg["ends"]
        for name in ("k", "v", "k_score", "pos"):
            if name not in t and f"{name}.0" not in t:
                continue
            values = fmt.unpack_layers(name, t, layers)
            if info["int8"] and name != "pos":
                scales = fmt.unpack_layers(f"{name}_scale", t, layers)
                values = [fmt.dequantize_int8(q, s, dtype) for q, s in zip(values, scales)]
            for i, x in enumerate(values):
                parts[i][name].append(x)
        for i in range(layers):
            if firsts[i] != have[i]:
                raise CorruptObject(f"reserve layer {i}: segment starts at {firsts[i]}, expected {have[i]}")
            have[i] = ends[i]
    if have != list(info["n"]):
        raise CorruptObject(f"reserve holds {have} tokens, manifest says {info['n']}")
    out = []
    for i, p in enumerate(parts):
        cat = lambda xs, dim: torch.cat(xs, dim=dim) if xs else None  # noqa: E731
        k = cat(p["k"], 1)
        out.append(
            {"k": k, "v": cat(p["v"], 1), "pos": cat(p["pos"], 0), "n": have[i],
             "k_score": None if info["shared_k_score"] else cat(p["k_score"], 1)}
        )
    return out


def resume_into(engine: Any, r: RestoredRequest) -> Sequence | None:
    """Put a restored request into `engine` (an LLMEngine) so the next step continues it.

    Exact restores take a free pool slot and load their cache through the policy's `load_state`;
    otherwise (no slot free, a cache that does not fit this server) the request re-prefills from its
    tokens at the front of the queue, and the token sampled after that is the next one. Returns None for
    a lost request; raises RequestError when this server cannot take the request at all.
    """
    if r.status == "lost":
        return None
    sampling, cache_config = SamplingParams(**r.sampling), CacheConfig(**r.cache_config)
    seq = engine.make_sequence(list(r.prompt_ids), sampling, cache_config, request_id=r.request_id)
    seq.output_ids = list(r.output_ids)
    if r.rng_state is not None and r.rng_state.dtype == torch.int64 and r.rng_state.numel() == 1:
        seq.seed = int(r.rng_state[0])
    seq.output_text = r.detok.get("output_text", "")
    seq.prefix_offset = r.detok.get("prefix_offset", len(seq.prompt_ids))
    seq.read_offset = r.detok.get("read_offset", len(seq.prompt_ids))
    seq.replacements = r.replacements
    with engine.lock:
        if r.status == "exact" and r.layers is not None and len(engine.slots) < engine.runner.pool.slots:
            engine.take_slot(seq)
            try:
                load_cache(seq, r)
                seq.num_cached = r.num_cached
            except (ValueError, RuntimeError) as e:
                log.warning("request %s: cache does not fit (%s); re-prefilling", r.request_id, e)
                engine.release_slot(seq)
        engine.scheduler.resume(seq)
    return seq


@torch.inference_mode()  # the same kind of tensors the runner makes, so its in-place updates stay legal
def load_cache(seq: Sequence, r: RestoredRequest) -> None:
    state = {name: torch.stack([layer[i] for layer in r.layers]) for i, name in enumerate(("k", "v", "pos", "score"))}
    if r.reserve is not None and r.reserve[0]["k"] is not None:
        state["rk"] = torch.stack([x["k"] for x in r.reserve])
        state["rv"] = torch.stack([x["v"] for x in r.reserve])
        if r.reserve[0]["k_score"] is not None:
            state["rks"] = torch.stack([x["k_score"] for x in r.reserve])
        state["rpos"] = r.reserve[0]["pos"]
        state["reserve_from"] = torch.tensor(0)
    seq.policy.load_state(seq.pool, seq.slot, state)
