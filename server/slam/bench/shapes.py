"""Model shapes for speed runs with random weights, and what a speed run needs besides: the measured
memory bandwidth, the weight and cache bytes a step reads, requests whose caches look prefilled."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from slam.bench.shape_configs import SHAPES  # noqa: F401  (the benches read the shapes from here)
from slam.cache import make_policy
from slam.engine.prefill import column
from slam.model import DTYPES, LoadedModel, pick_device

if TYPE_CHECKING:
    from slam.config import CacheConfig
    from slam.engine.engine import LLMEngine


def random_model(shape: dict, dtype: str = "bfloat16", device: str = "auto") -> LoadedModel:
    target = pick_device(device)
    config = LlamaConfig(**shape, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(DTYPES.get(dtype, torch.float32))
    try:
        with target:
            model = LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(default)
    return LoadedModel(name="random", path=None, model=model, tokenizer=None, device=target)


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes one decode step reads of the weights (an untied embedding is only indexed, not read)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    embed = model.get_input_embeddings().weight
    if embed is not model.get_output_embeddings().weight:
        total -= embed.numel() * embed.element_size()
    return total


def kv_read_bytes(engine: LLMEngine, cache: CacheConfig, context: int, batch: int) -> int:
    """Bytes of keys and values one decode step reads: the pool slots, plus what slam's selection reads
    (every reserve key, or two chunk bounds per chunk and the candidates' keys) and the chosen values, each at
    the precision it is stored in: an int8 reserve or scoring copy is a byte per element and a scale per row,
    the bounds int8 with a float32 scale per chunk."""
    pool = engine.runner.pool
    rows = pool.layers * pool.kv_heads  # a token's rows: one per layer and KV head
    read = 2 * rows * pool.head_dim * pool.k[0].element_size() * (pool.budget + 1) * batch
    if cache.policy == "slam":
        evicted = max(context - cache.sink - cache.recent, 0)
        middle = make_policy(cache).middle
        stored = rows * (pool.head_dim + 4 if pool.reserve_int8 else pool.head_dim * pool.k[0].element_size())
        # CPUs with int8 weights score int8 copies of the keys (a bfloat16 scale each).
        scored = rows * (pool.head_dim + 2) if pool.int8_scoring and not pool.reserve_int8 else stored
        keys = evicted * scored  # exact selection scores every reserve key at every step
        if pool.two_stage:
            # Stage one's two bounds per chunk once per `select_every` steps; stage two's candidates every step.
            bounds = rows * (2 * pool.head_dim + 4)
            keys = -(-evicted // pool.chunk) * bounds / engine.runner.select_every \
                + min(evicted, pool.first_chunks(middle) * pool.chunk) * scored
        read += int((keys + min(evicted, middle) * stored) * batch)
    return read


def bandwidth(device: torch.device) -> float:
    """Copy bandwidth in GB/s (bytes read plus written), measured now on `device`."""
    n = (1 << 30) if device.type == "cuda" else (1 << 26)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start, iters = time.perf_counter(), 10
    for _ in range(iters):
        dst.copy_(src)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n * iters / (time.perf_counter() - start) / 1e9


@torch.inference_mode()
def synthetic_request(engine, context: int, sampling, seed: int = 0):
    """A request whose slot holds random keys and values for `context` tokens, as if prefilled; it decodes at
    the next step. Only for speed runs: the tokens mean nothing."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, engine.runner.vocab_size, (context,), generator=g).tolist()
    seq = engine.make_sequence(prompt, sampling)
    seq.output_ids = [prompt[-1]]
    pool, policy = engine.runner.pool, seq.policy
    dev_gen = torch.Generator(device=pool.device).manual_seed(seed)
    randn = lambda shape: torch.randn(shape, device=pool.device, dtype=pool.dtype, generator=dev_gen)  # noqa: E731
    sink, _, ring, evicted = policy.counts(context)
    with engine.lock:
        if policy.uses_reserve and evicted:
            # Room for the prompt and the decode steps, made before take_slot sizes it for the prompt: a timed step
            # that grew the reserve would charge one request's growth (paid once in serving) to a handful, and a
            # growth holds the old reserve beside the new one (at 128K and batch 32, more than an H100 has).
            pool.ensure_reserve(evicted + sampling.max_tokens)
        engine.take_slot(seq)
        kept = list(range(sink)) + list(range(context - ring, context))
        if policy.keeps_scores:
            kept += list(range(sink, sink + min(policy.middle, evicted)))
        cols = torch.tensor([column(policy, p) for p in kept[: sink + ring]] +
                            [policy.sink + j for j in range(len(kept) - sink - ring)], dtype=torch.long,
                            device=pool.device)
        positions = torch.tensor(kept, dtype=torch.long, device=pool.device)
        for layer in range(pool.layers):
            shape = (pool.kv_heads, len(kept), pool.head_dim)
            pool.k[layer][seq.slot][:, cols] = randn(shape)
            pool.v[layer][seq.slot][:, cols] = randn(shape)
            pool.pos[layer][seq.slot][:, cols] = positions
        if policy.uses_reserve and evicted:
            part = (seq.slot, slice(None), slice(0, evicted))
            for layer in range(pool.layers):
                shape = (pool.kv_heads, evicted, pool.head_dim)
                pool.reserve_write(layer, part, randn(shape), randn(shape))
                pool.summarize(layer, seq.slot, 0, evicted)
            pool.rpos[seq.slot, :evicted] = torch.arange(sink, sink + evicted, device=pool.device)
        seq.num_cached = context
        engine.scheduler.resume(seq)
    return seq
