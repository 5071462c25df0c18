"""Model loading: GGUF files, Hugging Face directories of the supported families, bad paths."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, MistralConfig, Qwen2Config

from slam.engine.sequence import SamplingParams
from slam.model import ModelError, embedded_gguf_path, load_model, resolve_model_path
from tests.conftest import make_engine

FAMILIES = {
    "qwen2": lambda vocab: Qwen2Config(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                       initializer_range=0.25, tie_word_embeddings=True),
    "mistral": lambda vocab: MistralConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                                           max_position_embeddings=256, initializer_range=0.25, sliding_window=None),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_full_equals_transformers(family, smol, tmp_path):
    torch.manual_seed(1)
    AutoModelForCausalLM.from_config(FAMILIES[family](len(smol.tokenizer))).save_pretrained(tmp_path)
    smol.tokenizer.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    prompt = loaded.tokenizer.encode("A short test prompt for the family")
    with torch.no_grad():
        out = loaded.model.generate(torch.tensor([prompt], device=loaded.device), max_new_tokens=20, do_sample=False,
                                    min_new_tokens=20)
    engine = make_engine(loaded, "full")
    [seq] = engine.generate([prompt], SamplingParams(max_tokens=20, ignore_eos=True))
    assert seq.output_ids == out[0, len(prompt):].tolist()


def test_gguf_file_is_converted_once(tmp_path, monkeypatch):
    monkeypatch.setenv("SLAM_HOME", str(tmp_path))
    gguf = embedded_gguf_path()
    first = resolve_model_path(str(gguf))
    assert (first / "config.json").is_file() and (first / "model.safetensors").is_file()
    mtime = (first / "model.safetensors").stat().st_mtime
    assert resolve_model_path(str(gguf)) == first
    assert (first / "model.safetensors").stat().st_mtime == mtime


@pytest.mark.parametrize("make,message", [
    (lambda p: p / "missing", "does not exist"),
    (lambda p: (p / "weights.bin").write_bytes(b"x") and p / "weights.bin", "is not a .gguf file"),
    (lambda p: (p / "empty").mkdir() or p / "empty", "has no config.json"),
])
def test_bad_model_paths(tmp_path, make, message):
    with pytest.raises(ModelError, match=message):
        resolve_model_path(str(make(tmp_path)))
