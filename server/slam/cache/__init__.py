"""Cache policies. Adding one: a file with a `CachePolicy` subclass, its class in POLICIES and its name in
slam.config.POLICY_NAMES, an entry in tests/test_policies.py's POLICY_CASES."""

from slam.cache.base import CachePolicy, Evicted
from slam.cache.full import FullPolicy
from slam.cache.h2o import H2OPolicy
from slam.cache.slam import SlamPolicy
from slam.cache.snapkv import SnapKVPolicy
from slam.cache.streaming import StreamingPolicy
from slam.config import POLICY_NAMES

_CLASSES = {cls.name: cls for cls in (FullPolicy, StreamingPolicy, SlamPolicy, SnapKVPolicy, H2OPolicy)}
POLICIES: dict[str, type[CachePolicy]] = {name: _CLASSES[name] for name in POLICY_NAMES}
POLICY_IDS = {name: i for i, name in enumerate(POLICIES)}  # a slot's policy, as the decode step sees it


def make_policy(config, pool_budget: int | None = None) -> CachePolicy:
    """Build the policy a `CacheConfig` describes; `full` takes the pool's whole budget."""
    budget = pool_budget if config.policy == "full" else config.budget
    return POLICIES[config.policy](
        budget=budget, sink=config.sink, recent=config.recent, position_mode=config.position_mode
    )


__all__ = ["POLICIES", "POLICY_IDS", "CachePolicy", "Evicted", "make_policy"]
