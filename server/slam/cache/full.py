from dataclasses import dataclass
from typing import ClassVar

from slam.cache.base import CachePolicy


@dataclass
class FullPolicy(CachePolicy):
    """Keep every token: the uncompressed baseline that matches `transformers` generation."""

    name: ClassVar[str] = "full"

    def __post_init__(self) -> None:
        self.budget = None
