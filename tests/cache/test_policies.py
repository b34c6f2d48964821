import random

import pytest

from voltacache.cache.policies import POLICIES, eviction_order, victims


def entry(name, created, last_access, hits, benefit, size=10):
    return {
        "id": name,
        "created": created,
        "last_access": last_access,
        "hits": hits,
        "benefit": benefit,
        "size_bytes": size,
    }


ENTRIES = [
    entry("a", created=1, last_access=9, hits=5, benefit=10),  # old, recent, frequent, saves little
    entry("b", created=2, last_access=3, hits=0, benefit=50),  # stale, never hit, saves a lot
    entry("c", created=3, last_access=5, hits=2, benefit=5),  # saves least overall
    entry("d", created=4, last_access=7, hits=9, benefit=40),  # most valuable
]


@pytest.mark.parametrize(
    "policy, order",
    [
        ("fifo", "abcd"),
        ("lifo", "dcba"),
        ("lru", "bcda"),
        ("lfu", "bcad"),
        ("lcbfu", "cbad"),  # benefit x (hits + 1): a 60, b 50, c 15, d 400
    ],
)
def test_each_policy_evicts_in_its_order(policy, order):
    assert "".join(e["id"] for e in eviction_order(ENTRIES, policy)) == order


def test_random_is_a_seeded_permutation():
    a = eviction_order(ENTRIES, "random", random.Random(1))
    b = eviction_order(ENTRIES, "random", random.Random(1))
    assert [e["id"] for e in a] == [e["id"] for e in b] and sorted(e["id"] for e in a) == list("abcd")


def test_victims_respect_entries_and_bytes():
    assert [e["id"] for e in victims(ENTRIES, "fifo", max_entries=2, max_bytes=None)] == ["a", "b"]
    assert [e["id"] for e in victims(ENTRIES, "lifo", max_entries=None, max_bytes=25)] == ["d", "c"]
    assert victims(ENTRIES, "lru", max_entries=10, max_bytes=1000) == []


def test_unknown_policy():
    with pytest.raises(ValueError, match="unknown eviction policy"):
        eviction_order(ENTRIES, "mru")
    assert set(POLICIES) == {"fifo", "lifo", "lru", "lfu", "lcbfu", "random"}
