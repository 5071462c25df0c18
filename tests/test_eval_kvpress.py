"""`--compare kvpress`: the same prompts through kvpress's presses in kvpress's own environment.

kvpress pins an older transformers, so it lives in a separate virtual environment whose Python is given by
$SLAM_KVPRESS_PYTHON (docs/evals.md shows how to make one); without it the comparison tests are skipped.
"""

from __future__ import annotations

import json
import os

import pytest
from slam.cli import main
from slam.eval.kvpress_compare import DEFAULT_PRESSES, KvpressJob, run_kvpress
from slam.eval.ruler import make_sample
from slam.eval.split import encode_split

from tests.test_cli import run

PYTHON = os.environ.get("SLAM_KVPRESS_PYTHON")
needs_kvpress = pytest.mark.skipif(
    not PYTHON, reason="no kvpress environment: set SLAM_KVPRESS_PYTHON to the Python of a venv with kvpress"
)


@needs_kvpress
@pytest.mark.parametrize("unseen", [True, False])
def test_every_press_runs_on_the_same_prompt_cut(tiny, tiny_dir, unseen):
    samples = [make_sample(tiny.tokenizer, task, 160, 0) for task in ("niah_multikey", "vt")]
    jobs = [KvpressJob(str(i), s.prompt, 6) for i, s in enumerate(samples)]
    out = run_kvpress(PYTHON, tiny_dir, jobs, budgets=[48, 96], presses=DEFAULT_PRESSES, question_unseen=unseen)
    assert {"kvpress", "transformers", "torch"} <= out["versions"].keys()
    rows = out["results"]
    assert len(rows) == len(DEFAULT_PRESSES) * 2 * 2
    # AdaKV masks evicted slots with a key that every query must ignore, and finds none when a random
    # model's queries point every way; it runs on real weights (the next test).
    assert [r for r in rows if "error" in r and not r["press"].startswith("adakv_")] == []
    assert all("fake keys" in r["error"] for r in rows if "error" in r)
    for row in rows:
        ids = encode_split(tiny.tokenizer, samples[int(row["id"])].prompt, unseen)
        assert row["context_tokens"] == ids.boundary  # kvpress compresses exactly our context part
        assert row["compression_ratio"] == pytest.approx(1 - row["budget"] / ids.boundary)
        assert isinstance(row.get("answer", ""), str)


@needs_kvpress
def test_adakv_runs_on_the_real_model(smol, smol_dir):
    sample = make_sample(smol.tokenizer, "niah_multikey", 300, 0)
    out = run_kvpress(PYTHON, smol_dir, [KvpressJob("0", sample.prompt, 12)], budgets=[128],
                      presses=["adakv_snapkv", "adakv_expected_attention"], question_unseen=True)
    assert [r.get("error") for r in out["results"]] == [None, None]
    assert all(r["answer"].strip() for r in out["results"])


@needs_kvpress
def test_cli_ruler_compare_reports_presses_and_versions(tiny_dir):
    result = run("eval", "ruler", "--model", str(tiny_dir), "--tasks", "niah_multikey", "--policies", "slam",
                 "--budgets", "48", "--sink", "4", "--recent", "16", "--lengths", "160", "--compare", "kvpress",
                 "--kvpress-python", PYTHON, "--presses", "snapkv,adakv_snapkv", "--json")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.strip().splitlines()]
    assert {r["policy"] for r in rows[:-1]} == {"slam", "kvpress:snapkv", "kvpress:adakv_snapkv"}
    assert set(rows[-1]["summary"]["known"]) == {"slam/48", "kvpress:snapkv/48", "kvpress:adakv_snapkv/48"}
    assert "kvpress comparison ran with kvpress " in result.stderr


@needs_kvpress
def test_cli_niah_compare(tiny_dir, tmp_path):
    plot = tmp_path / "niah.png"
    result = run("eval", "niah", "--model", str(tiny_dir), "--policies", "streaming", "--budgets", "48", "--sink",
                 "4", "--recent", "16", "--lengths", "160", "--depths", "0.5", "--compare", "kvpress",
                 "--kvpress-python", PYTHON, "--presses", "knorm,tova", "--json", "--plot", str(plot))
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.strip().splitlines()]
    assert [(r["policy"], r["budget"]) for r in rows] == [("streaming", 48), ("kvpress:knorm", 48), ("kvpress:tova", 48)]
    assert len({r["key"] for r in rows}) == 1  # the same needle for every method
    assert plot.read_bytes()[:4] == b"\x89PNG"


def test_compare_without_a_kvpress_python_names_the_flag(tiny_dir, monkeypatch, capsys):
    monkeypatch.delenv("SLAM_KVPRESS_PYTHON", raising=False)
    code = main(["eval", "niah", "--model", str(tiny_dir), "--lengths", "128", "--compare", "kvpress"])
    err = capsys.readouterr().err
    assert code == 2 and "--kvpress-python: --compare kvpress needs the Python" in err


def test_compare_with_an_unknown_press_names_the_flag(tiny_dir, tmp_path, capsys):
    python = tmp_path / "python"
    python.write_text("")
    code = main(["eval", "ruler", "--model", str(tiny_dir), "--lengths", "128", "--compare", "kvpress",
                 "--kvpress-python", str(python), "--presses", "snapkv,bogus"])
    assert code == 2 and "--presses: unknown press 'bogus'" in capsys.readouterr().err


def test_runner_lists_the_same_presses_and_rejects_bad_requests_before_loading_kvpress():
    import subprocess
    import sys

    from slam.eval import kvpress_runner
    from slam.eval.kvpress_compare import RUNNER

    def runner(stdin: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(RUNNER)], input=stdin, capture_output=True, text=True, check=False)

    assert kvpress_runner.PRESSES == DEFAULT_PRESSES
    bad_json = runner("{oops")
    assert bad_json.returncode == 2 and "stdin is not JSON" in bad_json.stderr
    bad_press = runner(json.dumps({"model": "x", "presses": ["snapkv", "bogus"], "budgets": [8], "samples": []}))
    assert bad_press.returncode == 2 and "unknown press 'bogus'" in bad_press.stderr
