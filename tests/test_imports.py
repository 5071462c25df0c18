"""The operator runs without torch: the command line, the settings tree, the checkpoint layout and the
operator import none of it."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from slam.cache import POLICIES
from slam.config import POLICY_NAMES

ROOT = Path(__file__).resolve().parent.parent

OPERATOR_IMAGE = textwrap.dedent("""
    import contextlib, io, sys
    import slam.checkpoint.layout, slam_operator.cli, slam_operator.handlers
    from slam.cli import main
    from slam.config import ServerSettings

    ServerSettings.model_validate({"policy": "h2o", "allowed_policies": ["h2o", "slam"]}).policies
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        main(["operator", "--help"])
    assert "--all-namespaces" in out.getvalue(), out.getvalue()
    serving = {"torch", "transformers", "accelerate", "gguf", "safetensors", "sentencepiece", "matplotlib"}
    assert not serving & set(sys.modules), (serving & set(sys.modules), sorted(m for m in sys.modules if m.startswith("slam")))
""")


def test_operator_and_settings_import_without_torch():
    """What the operator image runs: `slam operator --help` through the whole command line, the operator's
    modules, settings validation and the checkpoint names, with none of the serving stack imported."""
    env = {"PYTHONPATH": f"{ROOT / 'server'}:{ROOT / 'operator'}", "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-c", OPERATOR_IMAGE], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]


def test_registry_follows_the_policy_names():
    assert list(POLICIES) == list(POLICY_NAMES)
    assert all(cls.name == name for name, cls in POLICIES.items())
