from dataclasses import dataclass
from typing import ClassVar

from slam.cache.base import CachePolicy


@dataclass
class FullPolicy(CachePolicy):
    """Keep every token: the uncompressed baseline that matches `transformers` generation.

    Its slot is one ring as long as the pool's budget that never wraps; the engine refuses a request
    whose prompt and `max_tokens` do not fit."""

    name: ClassVar[str] = "full"

    def __post_init__(self) -> None:
        self.sink = 0

    @property
    def ring(self) -> int:
        return self.budget or 0

    def columns_used(self, length: int) -> int:
        return min(length, self.budget)  # tokens fill columns in order: the state grows with the length only
