"""Cache policies. Adding one: a file with a `CachePolicy` subclass, a line in POLICIES, an entry in
tests/test_policies.py's POLICY_CASES."""

from slam.cache.base import CachePolicy, LayerCache
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


def make_policy(config) -> CachePolicy:
    """Build the policy a `CacheConfig` describes."""
    return POLICIES[config.policy](
        budget=config.budget, sink=config.sink, recent=config.recent, position_mode=config.position_mode
    )


__all__ = ["POLICIES", "CachePolicy", "LayerCache", "make_policy"]
