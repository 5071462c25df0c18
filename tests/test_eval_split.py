"""Prompts in two parts (context, question) and the question-unseen setting."""

from __future__ import annotations

import pytest
from slam.cli import main
from slam.config import CacheConfig, EngineConfig
from slam.engine.engine import LLMEngine
from slam.engine.sequence import SamplingParams
from slam.eval.niah import DEFAULT_NEEDLE, DEFAULT_QUESTION, niah_prompt
from slam.eval.ruler import make_sample
from slam.eval.split import (
    EngineHookMissing,
    SplitPrompt,
    encode_split,
    engine_has_boundaries,
    generate_split,
    require_boundaries,
)

from tests.conftest import make_engine

NO_HOOK = "the engine has no add_request(prefill_boundaries=...) yet; docs/evals.md says what it must do"


@pytest.fixture(scope="module")
def engine(tiny):
    return make_engine(tiny, "full")


def test_known_niah_prompt_is_the_chat_prompt_it_always_was(engine):
    prompt, _ = niah_prompt(engine, 300, 0.5, 0, DEFAULT_NEEDLE, DEFAULT_QUESTION)
    known = encode_split(engine.tokenizer, prompt, question_unseen=False)
    assert known.ids == engine.encode_chat([{"role": "user", "content": prompt.context + prompt.question}])
    assert engine.tokenizer.decode(known.question_ids).strip() == "<|im_end|>\n<|im_start|>assistant"


def test_unseen_prompt_puts_the_question_after_the_boundary(engine):
    prompt = make_sample(engine.tokenizer, "niah_multikey", 300, 0).prompt
    unseen = encode_split(engine.tokenizer, prompt, question_unseen=True)
    known = encode_split(engine.tokenizer, prompt, question_unseen=False)
    context_text = engine.tokenizer.decode(unseen.context_ids)
    question_text = engine.tokenizer.decode(unseen.question_ids)
    assert context_text.endswith(prompt.context[-40:]) and prompt.question.strip() not in context_text
    assert question_text.startswith(prompt.question) and question_text.endswith(prompt.answer_prefix)
    assert engine.tokenizer.decode(unseen.ids) == engine.tokenizer.decode(known.ids)  # same text, another cut
    assert unseen.boundary < known.boundary


def test_a_model_without_chat_template_gets_bos_and_a_newline(engine):
    class Plain:
        chat_template, bos_token = None, "<|endoftext|>"
        encode = staticmethod(engine.tokenizer.encode)

    ids = encode_split(Plain(), SplitPrompt("Some context.", " A question?", " Answer:"), question_unseen=True)
    assert engine.tokenizer.decode(ids.context_ids) == "<|endoftext|>Some context."
    assert engine.tokenizer.decode(ids.question_ids) == " A question?\n Answer:"


def test_unseen_without_the_engine_hook_fails_clearly(engine):
    if engine_has_boundaries(engine):
        pytest.skip("the engine has the hook")
    with pytest.raises(EngineHookMissing, match="prefill_boundaries"):
        require_boundaries(engine)
    ids = encode_split(engine.tokenizer, SplitPrompt("context " * 20, " question?"), question_unseen=True)
    with pytest.raises(EngineHookMissing):
        generate_split(engine, [ids], SamplingParams(max_tokens=2), CacheConfig(policy="full", budget=None), True)


def test_cli_question_unseen_without_the_hook_names_the_flag(engine, tiny_dir, capsys):
    if engine_has_boundaries(engine):
        pytest.skip("the engine has the hook")
    code = main(["eval", "ruler", "--model", str(tiny_dir), "--lengths", "128", "--question-unseen"])
    err = capsys.readouterr().err
    assert code == 2 and "--question-unseen: " in err and "prefill_boundaries" in err


@pytest.mark.parametrize("policy", ["snapkv", "h2o", "slam"])
def test_unseen_compresses_the_context_before_the_question(tiny, policy):
    """With the hook, an unseen prompt decodes exactly as the known prompt does when the prefill chunk ends
    at the boundary by construction: the context is one chunk, compressed, and the question the next."""
    prompt = make_sample(tiny.tokenizer, "niah_multikey", 256, 0).prompt
    ids = encode_split(tiny.tokenizer, prompt, question_unseen=True)
    cache = CacheConfig(policy=policy, budget=48, sink=4, recent=16)
    sampling = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    one_chunk = LLMEngine(EngineConfig(max_batch=4, prefill_chunk=4096, cache=cache), tiny)
    if not engine_has_boundaries(one_chunk):
        pytest.skip(NO_HOOK)
    aligned = LLMEngine(EngineConfig(max_batch=4, prefill_chunk=ids.boundary, cache=cache), tiny)
    assert len(ids.question_ids) <= ids.boundary
    [reference] = aligned.generate([ids.ids], sampling, cache)
    [unseen] = generate_split(one_chunk, [ids], sampling, cache, question_unseen=True)
    assert unseen.output_ids == reference.output_ids
    # The setting matters for these policies: prefilling question and context together decodes otherwise.
    [known] = one_chunk.generate([ids.ids], sampling, cache)
    assert known.output_ids != reference.output_ids
    # Two unseen requests batched together keep their own boundaries.
    other = encode_split(tiny.tokenizer, make_sample(tiny.tokenizer, "vt", 200, 1).prompt, question_unseen=True)
    both = generate_split(one_chunk, [ids, other], sampling, cache, question_unseen=True)
    assert both[0].output_ids == reference.output_ids
