"""TieredKv.lookup's probing logic (a fake G4 counting HEADs; the real stores are tested elsewhere)."""

from __future__ import annotations

import asyncio

import torch

from kvrelay.kvbm.cost_model import CostModel
from kvrelay.kvbm.tiered_kv import TieredKv


class CountingG4:
    tier, enabled = "G4", True

    def __init__(self, held: set[int]):
        self.held, self.heads = held, 0

    async def contains(self, hashes):
        self.heads += len(hashes)
        return [h in self.held for h in hashes]


class LocalTier(CountingG4):
    tier = "G2"


def lookup(stores, hashes, in_g1=None):
    kv = TieredKv(torch.zeros(4, 64, dtype=torch.uint8), CostModel(64, 16))
    kv.stores = stores
    return asyncio.run(kv.lookup(hashes, in_g1))


def test_a_prompt_nobody_stored_costs_one_head():
    g4 = CountingG4(set())
    assert lookup([g4], list(range(100))) == [None] * 100
    assert g4.heads == 1


def test_g4_probes_in_order_until_the_first_miss_and_skips_faster_tiers_and_g1():
    g2, g4 = LocalTier({0, 1}), CountingG4(set(range(2, 12)))
    found = lookup([g2, g4], list(range(40)), in_g1=lambda h: h == 2)
    assert found[:12] == ["G2", "G2", None] + ["G4"] * 9  # block 2 is in G1: neither tier is asked for it
    assert found[12:] == [None] * 28
    assert g4.heads == 1 + 8 + 8  # blocks 3 | 4-11 | 12-19 (12 misses: stop)
