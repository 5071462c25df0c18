"""The `slam` command line as a user runs it: real processes, exit codes and messages."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SLAM = [sys.executable, "-m", "slam.cli"]


def run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([*SLAM, *args], check=False, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize(
    "args,message",
    [
        (["generate", "--prompt", "hi", "--policy", "nope"], "--policy: unknown policy 'nope'"),
        (["generate", "--prompt", "hi", "--budget", "10"], "--budget: budget (10) must be at least sink + recent"),
        (["generate", "--prompt", "hi", "--budget", "ten"], "argument --budget: invalid int value: 'ten'"),
        (["generate", "--prompt", "hi", "--max-tokens", "0"], "--max-tokens"),
        (["generate", "--prompt", "hi", "--model", "/no/such/model"], "--model: model path /no/such/model does not exist"),
        (["eval", "niah", "--policies", "full,bogus"], "--policies: unknown policy 'bogus'"),
        (["eval", "niah", "--budgets", "abc"], "argument --budgets"),
        (["eval", "niah", "--needle", "no key here"], "--needle: the template must contain {key}"),
    ],
)
def test_bad_input_is_one_clear_line_and_exit_2(args, message):
    result = run(*args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_generate_streams_text(smol_dir):
    result = run("generate", "--prompt", "What is the capital of France?", "--chat", "--policy", "slam",
                 "--max-tokens", "16", "--stats")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    stats = json.loads(result.stderr.strip().splitlines()[-1])
    assert stats["generated_tokens"] <= 16


def test_cache_positions_generate_far_past_trained_length(tiny_dir):
    # The tiny model is trained for 64 positions; 10,000 tokens past that, the cache is still `budget` tokens.
    result = run("generate", "--model", str(tiny_dir), "--prompt", "Once upon a time", "--policy", "streaming",
                 "--position-mode", "cache", "--budget", "32", "--sink", "4", "--recent", "8",
                 "--max-tokens", "10064", "--ignore-eos", "--stats")
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stderr.strip().splitlines()[-1])
    assert stats["generated_tokens"] == 10064
    assert stats["cache_tokens"] == 32


def test_eval_ppl_json_and_plot(tiny_dir, tmp_path):
    plot = tmp_path / "ppl.png"
    result = run("eval", "ppl", "--model", str(tiny_dir), "--policies", "full,streaming,slam", "--tokens", "96",
                 "--budget", "24", "--sink", "2", "--recent", "8", "--window", "32", "--json", "--plot", str(plot))
    assert result.returncode == 0, result.stderr
    rows = {r["policy"]: r for r in map(json.loads, result.stdout.strip().splitlines())}
    assert set(rows) == {"full", "streaming", "slam"}
    assert rows["full"]["max_cache_tokens"] == 96
    assert rows["streaming"]["max_cache_tokens"] == rows["slam"]["max_cache_tokens"] == 24
    assert len(rows["full"]["curve"]) == 3 and all(r["ppl"] > 1 for r in rows.values())
    assert rows["streaming"]["ppl"] != rows["full"]["ppl"]  # eviction changes the predictions
    assert plot.stat().st_size > 10_000 and plot.read_bytes()[:4] == b"\x89PNG"


def test_eval_niah_json_table_and_plot(tiny_dir, tmp_path):
    plot = tmp_path / "niah.png"
    args = ["eval", "niah", "--model", str(tiny_dir), "--policies", "full,slam", "--budgets", "48,96", "--sink", "4",
            "--recent", "16", "--lengths", "200", "--depths", "0.5", "--seeds", "2"]
    result = run(*args, "--json", "--plot", str(plot))
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.strip().splitlines()]
    assert len(rows) == 2 * 3  # seeds x (full, slam/48, slam/96)
    assert {(r["policy"], r["budget"]) for r in rows} == {("full", None), ("slam", 48), ("slam", 96)}
    assert all({"policy", "budget", "length", "depth", "seed", "found", "answer"} <= r.keys() for r in rows)
    assert all(r["tokens"] > 0 for r in rows)
    churn = {r["budget"]: r["replacements"] for r in rows if r["seed"] == 0}
    assert churn[None] == 0 and churn[48] > 0  # only slam recalls tokens into its cache
    assert plot.read_bytes()[:4] == b"\x89PNG"
    table = run(*args)
    assert table.returncode == 0 and "slam" in table.stdout and "/2" in table.stdout


# --- the package itself ----------------------------------------------------------------------------------
SERVER = __import__("pathlib").Path(__file__).resolve().parents[1] / "server" / "slam"
# Which slam packages a package may import (design.md 2.5: none imports one above it).
LAYERS = {"cli": {"api", "bench"}, "bench": set(), "api": set()}


def slam_imports(path) -> set[str]:
    """Top-level slam packages a module imports anywhere in it (function-level imports included)."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module or ""] if isinstance(node, ast.ImportFrom) else []
        found |= {n.split(".")[1] for n in names if n.startswith("slam.") and n.count(".") >= 1}
    return found


def test_no_import_cycle_between_cli_api_and_bench():
    for package, allowed in LAYERS.items():
        for path in sorted((SERVER / package).glob("*.py")):
            rel = str(path.relative_to(SERVER))
            above = {p for p in slam_imports(path) & set(LAYERS) if p != package and p not in allowed}
            assert not above, f"{rel} imports slam.{above}"


def test_serve_flags_are_the_settings_fields():
    """No second list of flag names: every ServerSettings field but the secrets is a flag, with its help."""
    from slam.cli import build_parser
    from slam.config import ServerSettings

    serve = build_parser()._subparsers._group_actions[0].choices["serve"]
    flags = {a.dest: a for a in serve._actions if a.dest != "help"}
    secrets = {"s3_access_key", "s3_secret_key", "replica_token"}
    assert set(flags) == set(ServerSettings.model_fields) - secrets
    for name, action in flags.items():
        assert action.option_strings == ["--" + name.replace("_", "-")]
        assert action.help and ServerSettings.model_fields[name].description in action.help, name


@pytest.mark.parametrize("args,env,message", [
    (["--max-model-len", "0"], {}, "--max-model-len (SLAM_MAX_MODEL_LEN): "),
    (["--allowed-policies", "slam,magic"], {}, "unknown policy 'magic'"),
    ([], {"SLAM_RESUME_GRACE_S": "-1"}, "--resume-grace-s (SLAM_RESUME_GRACE_S): "),
    (["--policy", "slam", "--allowed-policies", "full"], {}, "--allowed-policies (SLAM_ALLOWED_POLICIES): "),
    (["--checkpoint-max-age", "5"], {}, "--checkpoint-max-age (SLAM_CHECKPOINT_MAX_AGE): "),
])
def test_serve_errors_name_flag_and_env(args, env, message, monkeypatch, capsys):
    from slam.cli import main

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(["serve", *args]) == 2  # settings fail before the model loads
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_env_lists_and_one_prefix(monkeypatch):
    from slam.config import ServerSettings

    monkeypatch.setenv("SLAM_ALLOWED_POLICIES", "slam,streaming")
    monkeypatch.setenv("SLAM_PEER_DOMAIN", "web-pods.default.svc.cluster.local")
    monkeypatch.setenv("SLAM_CHECKPOINT_RETENTION", "9")  # the checkpoint library's own prefix: not read
    settings = ServerSettings(s3_endpoint="127.0.0.1:9000", slot=3)
    assert settings.allowed_policies == ["slam", "streaming"]
    assert settings.peers == ["web-pods.default.svc.cluster.local"]
    ckpt = settings.checkpoint_config()
    assert (ckpt.retention, ckpt.slot, ckpt.endpoint) == (2, 3, "127.0.0.1:9000")
    assert settings.engine_config().cache == settings.cache_config()


def test_plugin_command_groups(monkeypatch, tmp_path, capsys):
    """`slam operator` comes from the operator package through the PLUGINS hook."""
    import slam.cli

    (tmp_path / "fake_plugin.py").write_text(
        "def register(sub):\n    sub.add_parser('operator').set_defaults(func=lambda args: 7)\n")
    (tmp_path / "broken_plugin.py").write_text("import no_such_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(slam.cli, "PLUGINS", {"fake_plugin": "operator", "not_installed_plugin": "other",
                                              "broken_plugin": "broken"})
    assert slam.cli.main(["operator"]) == 7
    assert slam.cli.main(["broken"]) == 2  # says which module and extra are missing, other commands still work
    assert "no_such_dependency" in capsys.readouterr().err


@pytest.mark.parametrize("given, want", [(None, "1"), ("0", "0")])
def test_the_command_backs_torch_allocations_with_huge_pages_unless_told_not_to(given, want):
    """`slam` sets torch's THP_MEM_ALLOC_ENABLE before torch is imported (torch reads it once), so that a large
    allocation lies in huge pages where the kernel offers them; a value the user gave stays."""
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if given is not None:
        env["THP_MEM_ALLOC_ENABLE"] = given
    code = ("import os, sys, slam.cli, torch; assert 'torch' in sys.modules\n"
            "def huge(): return int(next(l for l in open('/proc/self/smaps_rollup') if 'AnonHuge' in l).split()[1])\n"
            "before = huge(); t = torch.zeros(64 << 20, dtype=torch.int8)\n"
            "print(os.environ['THP_MEM_ALLOC_ENABLE'], huge() - before)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    value, grown_kb = out.stdout.split()
    assert value == want
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if want == "1" and thp.exists() and "[never]" not in thp.read_text():
        assert int(grown_kb) > 0  # huge pages, as many as the kernel could find whole
    if want == "0" and thp.exists() and "[always]" not in thp.read_text():
        assert int(grown_kb) == 0
