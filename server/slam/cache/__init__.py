"""Cache policies. Adding one: a file with a `CachePolicy` subclass, a line in POLICIES, an entry in
tests/test_policies.py's POLICY_CASES."""

from slam.cache.base import CachePolicy, Evicted
from slam.cache.full import FullPolicy
from slam.cache.h2o import H2OPolicy
from slam.cache.slam import SlamPolicy
from slam.cache.snapkv import SnapKVPolicy
from slam.cache.streaming import StreamingPolicy

POLICIES: dict[str, type[CachePolicy]] = {
    "full": FullPolicy,
    "streaming": StreamingPolicy,
    "slam": SlamPolicy,
    "snapkv": SnapKVPolicy,
    "h2o": H2OPolicy,
}
POLICY_IDS = {name: i for i, name in enumerate(POLICIES)}  # a slot's policy, as the decode step sees it


def make_policy(config, pool_budget: int | None = None) -> CachePolicy:
    """Build the policy a `CacheConfig` describes; `full` takes the pool's whole budget."""
    budget = pool_budget if config.policy == "full" else config.budget
    return POLICIES[config.policy](
        budget=budget, sink=config.sink, recent=config.recent, position_mode=config.position_mode
    )


__all__ = ["POLICIES", "POLICY_IDS", "CachePolicy", "Evicted", "make_policy"]
