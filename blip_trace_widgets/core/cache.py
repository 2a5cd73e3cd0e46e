"""A bounded least-recently-used cache, the one every cache of the package is built on.

    >>> from blip_trace_widgets.core.cache import LRU
    >>> cache = LRU(2)
    >>> cache.get_or_make("a", lambda: 1), cache.get_or_make("b", lambda: 2), cache.get_or_make("c", lambda: 3)
    (1, 2, 3)
    >>> "a" in cache, len(cache)
    (False, 2)
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

from .errors import BlipTraceError

V = TypeVar("V")


class LRU(Generic[V]):
    """At most ``size`` entries, and (with ``weigh``) at most ``max_weight`` in all, the newest entry
    excepted; the least recently used one is dropped first, so its memory is released."""

    def __init__(self, size: int, *, max_weight: int | None = None, weigh: Callable[[V], int] | None = None) -> None:
        if size < 1:
            raise BlipTraceError(f"a cache needs room for at least one entry, got size {size}")
        self.size = size
        self.max_weight = max_weight
        self.weigh = weigh
        self._entries: OrderedDict[Hashable, V] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable) -> V | None:
        if key not in self._entries:
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return self._entries[key]

    def values(self) -> list[V]:
        """The entries, least recently used first (without touching their order)."""
        return list(self._entries.values())

    def weight(self) -> int:
        """The entries' total weight (0 without ``weigh``)."""
        return sum(self.weigh(v) for v in self._entries.values()) if self.weigh is not None else 0

    def put(self, key: Hashable, value: V) -> V:
        self._entries[key] = value
        self._entries.move_to_end(key)
        while len(self._entries) > self.size or (
                self.max_weight is not None and len(self._entries) > 1 and self.weight() > self.max_weight):
            self._entries.popitem(last=False)
        return value

    def get_or_make(self, key: Hashable, make: Callable[[], V]) -> V:
        """The entry for ``key``, made (and kept) when it is missing."""
        if key in self._entries:
            return self.get(key)  # type: ignore[return-value]
        self.misses += 1
        return self.put(key, make())

    def clear(self) -> None:
        self._entries.clear()
