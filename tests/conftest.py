"""Shared fixtures: the real embedded model, and a tiny random Llama for exhaustive policy checks."""

from __future__ import annotations

import os

# Test servers and the test process share two cores; spinning OpenMP threads then stall every small
# tensor op for milliseconds. Set before torch loads, and inherited by every process a test starts.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from slam.config import CacheConfig, EngineConfig
from slam.engine.engine import LLMEngine
from slam.model import ensure_embedded_model, load_model

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def smol_dir() -> Path:
    return ensure_embedded_model()


@pytest.fixture(scope="session")
def smol(smol_dir):
    return load_model(None)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, smol) -> Path:
    """A 2-layer random Llama with the real tokenizer and a trained length of only 64 positions."""
    path = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(smol.tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
        bos_token_id=1, eos_token_id=2, tie_word_embeddings=True, initializer_range=0.25,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    smol.tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    return load_model(str(tiny_dir))


def make_engine(loaded, policy: str = "full", **cache) -> LLMEngine:
    budget = cache.pop("budget", 256)
    budget = None if policy == "full" else budget
    # A full cache holds whole requests: 1,024 tokens covers every test (also past a tiny model's 64).
    max_budget = cache.pop("max_budget", 1024 if policy == "full" else None)
    engine = {"max_batch": 8, "prefill_chunk": 512}
    engine.update({name: cache.pop(name) for name in list(cache) if name in EngineConfig.model_fields})  # select_*, ...
    config = EngineConfig(max_budget=max_budget, cache=CacheConfig(policy=policy, budget=budget, **cache), **engine)
    return LLMEngine(config, loaded)
