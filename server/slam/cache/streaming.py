from dataclasses import dataclass
from typing import ClassVar

from slam.cache.base import CachePolicy


@dataclass
class StreamingPolicy(CachePolicy):
    """StreamingLLM: the `sink` first tokens plus a sliding window that fills the rest of the budget.

    Every query, prefill included, sees exactly its own window, so the result does not depend on how
    the prompt is chunked.
    """

    name: ClassVar[str] = "streaming"
    sliding_window: ClassVar[bool] = True

    @property
    def ring(self) -> int:
        return self.budget - self.sink
