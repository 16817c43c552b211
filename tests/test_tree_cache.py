"""The replica tree cache: byte budget with LRU eviction, one load per document however
many concurrent requests, concurrent loads of different documents, and errors that are
errors (never cached)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from ctxtree.store import Corrupt, FingerprintMismatch, Manifest, NotFound, TreeStore, document_key
from ctxtree.kernels.tree import TreeConfig, build_tree
from ctxtree.kernels.treefile import shard_tree
from ctxtree.serve.tree_cache import TooLarge, TreeCache

FP = "c" * 64


@pytest.fixture(scope="module")
def store(tiny_model, tmp_path_factory) -> TreeStore:
    store = TreeStore(str(tmp_path_factory.mktemp("cache-store")))
    cfg = TreeConfig(n_layers=2, chunk_len=32, height=3, keep=4)
    for i, n in enumerate([100, 100, 100, 400]):
        tree = build_tree(tiny_model, torch.randint(3, 97, (n,), generator=torch.Generator().manual_seed(i)), cfg)
        key = document_key(f"text {i}", FP)
        records = tuple(store.write_shard(key, s) for s in shard_tree(FP, key, tree, tree.n_chunks, n, 1 << 20))
        store.commit(Manifest(f"d{i}", key, FP, n, tree.n_chunks, cfg.to_dict(), records))
    return store


class SlowStore:
    """The real store, with each load taking a while and counted, to observe concurrency."""

    def __init__(self, store: TreeStore, delay: float):
        self.store, self.delay = store, delay
        self.loads: list[str] = []
        self.active = 0
        self.max_active = 0
        self.lock = threading.Lock()

    def manifest(self, doc_id, fingerprint):
        return self.store.manifest(doc_id, fingerprint)

    def load_tree(self, manifest):
        with self.lock:
            self.loads.append(manifest.doc_id)
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        time.sleep(self.delay)
        try:
            return self.store.load_tree(manifest)
        finally:
            with self.lock:
                self.active -= 1


def test_concurrent_requests_for_one_document_load_it_once(store):
    slow = SlowStore(store, 0.3)

    async def run():
        cache = TreeCache(slow, FP, budget_bytes=10 << 20)
        got = await asyncio.gather(*[cache.get("d0") for _ in range(8)], cache.get("d1"), cache.get("d2"))
        return cache, got

    cache, got = asyncio.run(run())
    assert sorted(slow.loads) == ["d0", "d1", "d2"]
    assert slow.max_active >= 2, "loads of different documents must overlap"
    assert all(g is got[0] for g in got[:8]) and got[0].manifest.doc_id == "d0"
    assert (cache.stats.misses, cache.stats.hits) == (3, 7)
    assert cache.stats.bytes == got[0].nbytes + got[8].nbytes + got[9].nbytes


def test_byte_budget_evicts_least_recently_used(store):
    async def run():
        probe = TreeCache(store, FP, budget_bytes=10 << 20)
        one = (await probe.get("d0")).nbytes
        cache = TreeCache(store, FP, budget_bytes=int(2.5 * one))
        await cache.get("d0")
        await cache.get("d1")
        await cache.get("d0")          # d0 is now the most recently used
        await cache.get("d2")          # over budget: d1 goes
        return cache, one

    cache, one = asyncio.run(run())
    assert cache.resident() == ["d0", "d2"]
    assert cache.stats.evictions == 1 and cache.stats.bytes == 2 * one <= cache.budget_bytes
    assert (cache.stats.hits, cache.stats.misses) == (1, 3)


def test_errors_are_raised_to_every_waiter_and_never_cached(store, tmp_path):
    async def run():
        cache = TreeCache(store, FP, budget_bytes=10 << 20)
        with pytest.raises(NotFound):
            await cache.get("nope")
        results = await asyncio.gather(cache.get("nope"), cache.get("nope"), return_exceptions=True)
        assert all(isinstance(r, NotFound) for r in results)
        with pytest.raises(FingerprintMismatch):
            await TreeCache(store, "d" * 64, 10 << 20).get("d0")
        small = TreeCache(store, FP, budget_bytes=1000)
        with pytest.raises(TooLarge):
            await small.get("d3")
        return cache

    cache = asyncio.run(run())
    assert "nope" not in cache and cache.stats.load_errors == 2 and cache.stats.bytes == 0


def test_a_corrupt_object_is_an_error(store):
    m = store.manifest("d2", FP)
    original = store.objects.get(m.shards[0].name)
    damaged = bytearray(original)
    damaged[100] ^= 0xFF
    store.objects.put(m.shards[0].name, bytes(damaged))
    try:
        async def run():
            cache = TreeCache(store, FP, budget_bytes=10 << 20)
            with pytest.raises(Corrupt):
                await cache.get("d2")
            return cache
        assert "d2" not in asyncio.run(run())
    finally:
        store.objects.put(m.shards[0].name, original)
