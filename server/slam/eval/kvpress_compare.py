"""The kvpress side of `--compare kvpress`: the same split prompts through kvpress's presses, in kvpress's
own environment (`--kvpress-python`), scored by the same checker as our runs."""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from slam.eval.split import SplitPrompt

RUNNER = Path(__file__).with_name("kvpress_runner.py")
DEFAULT_PRESSES = ["streaming_llm", "snapkv", "observed_attention", "expected_attention", "tova", "knorm",
                   "adakv_snapkv", "adakv_expected_attention"]


class KvpressError(RuntimeError):
    """kvpress's environment could not run the comparison; the message carries its error."""


@dataclass(frozen=True)
class KvpressJob:
    id: str
    prompt: SplitPrompt
    max_tokens: int


def kvpress_python(flag: str | None) -> str | None:
    """The Python of kvpress's environment: `--kvpress-python`, else $SLAM_KVPRESS_PYTHON."""
    return flag or os.environ.get("SLAM_KVPRESS_PYTHON") or None


def run_kvpress(python: str, model_dir: Path, jobs: list[KvpressJob], budgets: list[int], presses: list[str],
                question_unseen: bool, device: str = "cpu", dtype: str = "float32") -> dict:
    """Run the jobs through every press at every budget; returns the runner's {"versions", "results"}."""
    request = {
        "model": str(model_dir), "device": device, "dtype": dtype, "presses": presses, "budgets": budgets,
        "question_unseen": question_unseen,
        "samples": [{"id": j.id, "context": j.prompt.context, "question": j.prompt.question,
                     "answer_prefix": j.prompt.answer_prefix, "max_new_tokens": j.max_tokens} for j in jobs],
    }
    env = os.environ | {"TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    env.pop("PYTHONPATH", None)  # kvpress's environment must not see this one's packages
    try:
        done = subprocess.run([python, str(RUNNER)], input=json.dumps(request), capture_output=True, text=True,
                              env=env, check=False)
    except OSError as e:
        raise KvpressError(f"cannot run {python}: {e}") from None
    if done.returncode != 0:
        raise KvpressError(f"{python} {RUNNER.name} exited {done.returncode}: {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout)
