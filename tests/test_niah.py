"""The point of SLAM: query-aware recall finds a needle that a sink + window cache has evicted."""

from __future__ import annotations

from slam.config import CacheConfig
from slam.eval.niah import run_niah
from tests.conftest import make_engine


def test_slam_finds_needles_streaming_loses(smol):
    engine = make_engine(smol, "full")
    caches = [CacheConfig(policy=p, budget=256, sink=4, recent=64) for p in ("slam", "streaming")]
    cases = list(run_niah(engine, caches, lengths=[2000], depths=[0.1, 0.5, 0.9], seeds=3))
    found = {p: sum(c.found for c in cases if c.policy == p) for p in ("slam", "streaming")}
    assert len(cases) == 18
    assert found["slam"] >= 8, cases
    assert found["streaming"] <= 3, cases
    # At 2K and the default threshold the reserve is scored token by token; the rows say so.
    assert {c.two_stage for c in cases if c.policy == "slam"} == {False}
    assert {c.two_stage for c in cases if c.policy == "streaming"} == {None}


def test_niah_rows_say_when_two_stages_scored_the_reserve(smol):
    cache = dict(budget=128, sink=4, recent=32)
    engine = make_engine(smol, "slam", select_min_ratio=1, select_oversample=8, **cache)
    [case] = run_niah(engine, [CacheConfig(policy="slam", **cache)], lengths=[1500], depths=[0.5], seeds=1)
    assert case.two_stage is True and case.tokens > 0
