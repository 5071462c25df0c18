"""Issue 9, engine side: sampling semantics (vLLM's) that the API exposes, and failures that stay with the
request they concern. The real embedded model; expected values from transformers or from the definition."""

from __future__ import annotations

import math

import pytest
import torch

from slam.config import CacheConfig, EngineConfig
from slam.engine.engine import LLMEngine
from slam.engine.sampler import penalize, process, token_logprobs
from slam.engine.sequence import SamplingParams

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def engine(smol) -> LLMEngine:
    return LLMEngine(EngineConfig(max_batch=4, cache=CacheConfig(policy="full", budget=None)), loaded=smol)


def run(engine, prompt_ids, **sampling):
    deltas = []
    (seq,) = engine.generate([prompt_ids], SamplingParams(**sampling), on_output=deltas.append)
    return seq, deltas


def test_penalties_follow_vllm():
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0, -2.0])
    p = SamplingParams(repetition_penalty=1.5, frequency_penalty=0.5, presence_penalty=0.25)
    out = penalize(logits, p, prompt_ids=[0], output_ids=[1, 3, 3])
    # repetition: seen tokens 0, 1, 3; positive logits divided, negative multiplied
    # frequency/presence: output counts 1 -> 1, 3 -> 2
    want = [2.0 / 1.5, -1.0 * 1.5 - 0.5 - 0.25, 0.5, 3.0 / 1.5 - 1.0 - 0.25, -2.0]
    assert out.tolist() == pytest.approx(want)
    assert logits.tolist() == [2.0, -1.0, 0.5, 3.0, -2.0]  # the raw logits are left alone
    masked = process(logits, SamplingParams(min_tokens=2, stop_token_ids=[4]), [0], [1], eos_ids={3})
    assert masked[3] == masked[4] == float("-inf") and masked[0] == 2.0
    assert process(logits, SamplingParams(min_tokens=2, ignore_eos=True), [0], [1], {3})[3] == 3.0
    assert process(logits, SamplingParams(min_tokens=1), [0], [1], {3})[3] == 3.0  # reached


def test_logprobs_are_the_models(engine, smol):
    ids = engine.encode(PROMPT)
    seq, outs = run(engine, ids, max_tokens=2, logprobs=3)
    with torch.no_grad():
        logits = smol.model(torch.tensor([ids])).logits[0, -1].float()
    logp = torch.log_softmax(logits, -1)
    first = outs[0]
    assert first.token_id == int(logits.argmax())
    assert first.logprob == pytest.approx(float(logp.max()), abs=1e-3)
    assert [t for t, _ in first.top_logprobs] == torch.topk(logp, 3).indices.tolist()
    assert [lp for _, lp in first.top_logprobs] == pytest.approx(torch.topk(logp, 3).values.tolist(), abs=1e-3)
    assert all(o.logprob <= 0 for o in outs)
    _, plain = run(engine, ids, max_tokens=1)
    assert plain[0].logprob is None and plain[0].top_logprobs is None
    _, only = run(engine, ids, max_tokens=1, logprobs=0)
    assert only[0].top_logprobs == [] and only[0].logprob == pytest.approx(first.logprob, abs=1e-4)


def test_penalized_greedy_matches_a_reference(engine, smol):
    """Greedy decoding with all three penalties equals a step-by-step reference over transformers' logits."""
    ids = engine.encode("one one one, two two, three")
    penalties = dict(repetition_penalty=1.8, frequency_penalty=0.7, presence_penalty=0.4)
    seq, _ = run(engine, ids, max_tokens=6, ignore_eos=True, **penalties)
    out: list[int] = []
    for _ in range(6):
        with torch.no_grad():
            logits = smol.model(torch.tensor([ids + out])).logits[0, -1].float()
        for t in set(ids + out):
            logits[t] = logits[t] / 1.8 if logits[t] > 0 else logits[t] * 1.8
        for t in set(out):
            logits[t] -= 0.7 * out.count(t) + 0.4
        out.append(int(logits.argmax()))
    assert seq.output_ids == out
    plain, _ = run(engine, ids, max_tokens=6, ignore_eos=True)
    assert plain.output_ids != out


def test_stop_token_ids_and_min_tokens(engine):
    ids = engine.encode(PROMPT)
    free, _ = run(engine, ids, max_tokens=6, ignore_eos=True)
    stop = free.output_ids[1]
    seq, _ = run(engine, ids, max_tokens=6, ignore_eos=True, stop_token_ids=[stop])
    assert seq.output_ids == free.output_ids[:2] and seq.finish_reason == "stop"
    # The stop token counts as generated, but its text is not part of the output (vLLM).
    assert seq.output_text == engine.tokenizer.decode(free.output_ids[:1], skip_special_tokens=True)
    held, _ = run(engine, ids, max_tokens=6, ignore_eos=True, stop_token_ids=[stop], min_tokens=3)
    assert stop not in held.output_ids[:3]


def test_eos_waits_for_min_tokens(engine):
    chat = engine.encode_chat([{"role": "user", "content": "Hi!"}])
    short, _ = run(engine, chat, max_tokens=40)
    assert short.finish_reason == "stop" and len(short.output_ids) < 40
    longer, _ = run(engine, chat, max_tokens=40, min_tokens=len(short.output_ids) + 5)
    assert len(longer.output_ids) >= len(short.output_ids) + 5


def test_streamed_text_never_shows_what_a_stop_string_cuts(engine):
    ids = engine.encode("Count with words: one, two, three, four, five, six, seven")
    free, _ = run(engine, ids, max_tokens=16, ignore_eos=True)
    text = free.output_text
    cut = len(text) // 2
    stop = text[cut : cut + 4]
    decoy = text[2:5] + "\u2603"  # starts like the text, never completes: held, then released
    seq, outs = run(engine, ids, max_tokens=16, ignore_eos=True, stop=[decoy, stop])
    assert seq.finish_reason == "stop" and seq.output_text == text[: text.find(stop)]
    shown = ""
    for out in outs:
        shown += out.text
        assert seq.output_text.startswith(shown), (shown, seq.output_text)
    assert shown == seq.output_text
    # Held text is released at the end of a request that stops for another reason.
    seq, outs = run(engine, ids, max_tokens=16, ignore_eos=True, stop=[text[-2:] + "\u2603"])
    assert "".join(o.text for o in outs) == seq.output_text == text and seq.finish_reason == "length"


def test_a_failing_request_fails_alone(engine, monkeypatch):
    """NaN logits fail their request with an error; the batch's others go on."""
    ids = engine.encode(PROMPT)
    bad = engine.add_request(ids, SamplingParams(max_tokens=4, temperature=1.0, seed=1))
    good = engine.add_request(ids, SamplingParams(max_tokens=4))
    real = engine.runner_step

    def nan_for_bad(batch):
        rows, logits = real(batch)
        if logits is not None:
            logits = logits.clone()
            for i, seq in enumerate(rows):
                if seq is bad:
                    logits[i] = float("nan")
        return rows, logits

    monkeypatch.setattr(engine, "runner_step", nan_for_bad)
    errors = []
    while engine.has_work():
        errors += [o for o in engine.step() if o.error]
    assert [o.seq for o in errors] == [bad] and "NaN" in errors[0].error
    assert bad.finish_reason == "error" and good.finish_reason == "length" and len(good.output_ids) == 4


def test_sampling_params_checked():
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(max_tokens=2, min_tokens=3)
    with pytest.raises(ValueError):
        SamplingParams(repetition_penalty=0)
    with pytest.raises(ValueError):
        SamplingParams(logprobs=21)
    assert token_logprobs(torch.zeros(4), 1, 2)[0] == pytest.approx(math.log(0.25))
