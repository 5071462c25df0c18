"""Int8 weights on the CPU (engine/int8.py): close to float32 on both paths (decode rows through aten's
int8 kernel, prefill chunks dequantized), every projection converted, and the real model still greedy-decodes
what float32 decodes on a clear prompt."""

from __future__ import annotations

import contextlib

import pytest
import torch
from slam.cache import cpu_kernels
from slam.config import CacheConfig, EngineConfig
from slam.engine.engine import LLMEngine
from slam.engine.int8 import Int8Linear, decode_step
from slam.engine.sequence import SamplingParams
from torch import nn


@pytest.mark.parametrize("decode", [True, False], ids=["decode", "prefill"])
@pytest.mark.parametrize("rows", [1, 4, 17, 200])
def test_int8_linear_close_to_float32(rows, decode):
    torch.manual_seed(rows)
    linear = nn.Linear(576, 1536)
    q = Int8Linear(linear)
    assert q.weight.dtype == torch.int8 and q.weight.shape == linear.weight.shape
    x = torch.randn(2, rows, 576)
    with torch.inference_mode(), (decode_step() if decode else contextlib.nullcontext()):
        want, got = linear(x), q(x)
    assert got.shape == want.shape and got.dtype == torch.float32
    assert float((got - want).norm() / want.norm()) < 0.01


def test_int8_decode_rows_do_not_depend_on_the_batch():
    """A decode row gets the same result alone or among 40 others: batching never changes a request's tokens."""
    torch.manual_seed(0)
    q = Int8Linear(nn.Linear(576, 1536))
    x = torch.randn(41, 576)
    with torch.inference_mode(), decode_step():
        batch = q(x)
        assert all(torch.equal(q(x[i : i + 1]), batch[i : i + 1]) for i in (0, 7, 40))


def test_int8_engine_converts_every_projection_and_decodes_like_float32(smol):
    def engine(dtype):
        config = EngineConfig(dtype=dtype, max_batch=2, cache=CacheConfig(policy="slam", budget=96))
        return LLMEngine(config, smol)

    fp32, int8 = engine("float32"), engine("int8")
    runner = int8.runner
    linears = [m for m in runner.layers.modules() if isinstance(m, (nn.Linear, Int8Linear))]
    assert linears and all(isinstance(m, Int8Linear) for m in linears) and isinstance(runner.lm_head, Int8Linear)
    assert len(linears) == 4 * len(runner.layers)  # qkv, o, gate_up, down
    prompt = fp32.encode("The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is")
    sampling = SamplingParams(max_tokens=8)
    want = fp32.generate([prompt], sampling)[0].output_ids
    got = int8.generate([prompt], sampling)[0].output_ids
    assert got == want, (fp32.tokenizer.decode(want), fp32.tokenizer.decode(got))


def test_int8_request_decodes_the_same_whatever_shares_its_steps(smol):
    """int8 decode rows round activations to bfloat16, which magnifies any last-bit difference upstream: a
    request must get bit-identical attention and selection whatever else runs in its steps (other policies,
    h2o's probabilities, other reserve lengths). Requests of four cache settings arrive at random steps
    into a shared engine and decode what each decodes alone (the soak test's mix, in process)."""
    import random

    from slam.engine.sequence import Status

    caches = [CacheConfig(policy="slam", budget=24, sink=4, recent=8),
              CacheConfig(policy="streaming", budget=16, sink=2, recent=8), CacheConfig(policy="full"),
              CacheConfig(policy="h2o", budget=32, sink=4, recent=8)]

    def engine(batch):
        return LLMEngine(EngineConfig(dtype="int8", max_batch=batch, cache=caches[0], max_budget=64,
                                      max_model_len=320), smol)

    texts = ["Fact 0: the mayor of a small town is", "Fact 1: the river of a small town is"]
    prompts = [smol.tokenizer.encode(t) for t in texts]
    prompts += [smol.tokenizer.encode(smol.tokenizer.apply_chat_template(
        [{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True)) for t in texts]
    requests = [(p, c) for p in range(len(prompts)) for c in range(len(caches))]
    sampling = SamplingParams(max_tokens=12, ignore_eos=True)
    alone, reference = {}, engine(1)
    for p, c in requests:
        alone[p, c] = reference.generate([prompts[p]], sampling, caches[c])[0].output_ids
    shared, rng = engine(16), random.Random(0)
    pending, live = requests[:], []
    rng.shuffle(pending)
    while pending or any(s.status is not Status.FINISHED for _, s in live):
        for _ in range(rng.randint(0, 3)):
            if pending:
                p, c = pending.pop()
                live.append(((p, c), shared.add_request(prompts[p], sampling, caches[c])))
        shared.step()
    assert {key: seq.output_ids for key, seq in live} == alone


def test_int8_engine_keeps_its_cache_in_bfloat16(smol):
    """Int8 weights make bfloat16 keys and values, so the pool and the reserve keep them in bfloat16 (half of a
    float32 cache's bytes), and the reserve's int8 scoring copies are made from the keys it keeps."""
    from slam.engine.pool import quantize_rows

    def engine(dtype):
        return LLMEngine(EngineConfig(dtype=dtype, max_batch=1, cache=CacheConfig(policy="slam", budget=32, sink=4,
                                                                                  recent=8)), smol)

    fp32, int8 = engine("float32"), engine("int8")
    prompt = fp32.encode("Notes: " + " ".join(f"item {i} is {i * 7 % 10};" for i in range(30)) + " item 3 is")
    seq = int8.add_request(prompt, SamplingParams(max_tokens=64, ignore_eos=True))
    for _ in range(16):  # looked at mid-flight: a finished request's slot is cleared
        if len(seq.output_ids) >= 4:
            break
        int8.step()
    assert len(seq.output_ids) >= 4, seq.status
    pool = int8.runner.pool
    assert {t.dtype for t in pool.k + pool.v + pool.rk + pool.rv} == {torch.bfloat16}
    if cpu_kernels.available():  # aten's SDPA in bfloat16 is slow on CPUs: the cache's own attention op reads it
        assert int8.runner.decode_attend is cpu_kernels.decode_attend
        assert fp32.runner.decode_attend is not cpu_kernels.decode_attend
    assert fp32.runner.pool.k[0].dtype == torch.float32
    assert 2 * pool.nbytes_per_slot() == fp32.runner.pool.nbytes_per_slot()
    evicted = int((pool.rpos[seq.slot] >= 0).sum())
    assert evicted > len(prompt) // 2
    for layer in (0, len(pool.rk) - 1):
        q, scale = quantize_rows(pool.rk[layer][seq.slot, :, :evicted], torch.bfloat16)
        assert torch.equal(pool.rq[layer][seq.slot, :, :evicted], q)
        assert torch.equal(pool.rq_scale[layer][seq.slot, :, :evicted], scale)
