"""Eviction orders: which entries go first when the cache is over capacity.

LCBFU (NIRVANA, NSDI'24): least computationally beneficial and frequently used. An entry's value
is the denoising steps it saves each time it is served, times how often it was served; the
cheapest-to-lose go first. The classic orders are here for comparison.
"""

from __future__ import annotations

import random
from collections.abc import Callable

# Each key sorts entries so that the first is evicted first. Entries are dicts with created,
# last_access, hits and benefit.
ORDERS: dict[str, Callable[[dict], tuple]] = {
    "fifo": lambda e: (e["created"],),
    "lifo": lambda e: (-e["created"],),
    "lru": lambda e: (e["last_access"], e["created"]),
    "lfu": lambda e: (e["hits"], e["last_access"]),
    "lcbfu": lambda e: (e["benefit"] * (e["hits"] + 1), e["last_access"]),
}
POLICIES = (*ORDERS, "random")


def eviction_order(entries: list[dict], policy: str, rng: random.Random | None = None) -> list[dict]:
    if policy == "random":
        shuffled = list(entries)
        (rng or random.Random()).shuffle(shuffled)
        return shuffled
    if policy not in ORDERS:
        raise ValueError(f"unknown eviction policy {policy!r}; choose one of {', '.join(POLICIES)}")
    return sorted(entries, key=ORDERS[policy])


def victims(
    entries: list[dict], policy: str, max_entries: int | None, max_bytes: int | None, rng: random.Random | None = None
) -> list[dict]:
    """The entries to evict, in order, to bring the cache within both capacities."""
    count, size = len(entries), sum(e["size_bytes"] for e in entries)
    chosen = []
    for entry in eviction_order(entries, policy, rng):
        if (max_entries is None or count <= max_entries) and (max_bytes is None or size <= max_bytes):
            break
        chosen.append(entry)
        count, size = count - 1, size - entry["size_bytes"]
    return chosen
