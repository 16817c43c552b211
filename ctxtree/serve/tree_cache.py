"""The tree cache of a decoder replica: documents' context trees in memory under a
byte budget, least recently used evicted first.

Loads run in worker threads (pyarrow I/O and checksums release the GIL), so loads of
different documents proceed concurrently and never block the event loop; concurrent
requests for one document share a single load. Every load goes through the store's
verified path (manifest checksums, tree-object checksums, model fingerprint), and a
failed load is an error for every waiter, never an entry in the cache.

Counters are cumulative and mean exactly what their names say (anchors.md #7):
hits (served from memory, including joins of an in-flight load), misses (a load was
started), evictions, load_errors, and bytes (resident tree bytes, a gauge).
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from ctxtree.store import Manifest, StoreError, TreeStore
from ctxtree.kernels.tree import ContextTree


@dataclass(frozen=True)
class CachedTree:
    manifest: Manifest
    tree: ContextTree
    nbytes: int
    load_ms: float


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    load_errors: int = 0
    bytes: int = 0
    load_ms: list[float] = field(default_factory=list)  # drained by whoever exports metrics


class TooLarge(StoreError):
    """A document whose trees alone exceed the cache's byte budget."""


class TreeCache:
    def __init__(self, store: TreeStore, fingerprint: str, budget_bytes: int, load_threads: int = 4):
        if budget_bytes <= 0:
            raise ValueError(f"budget_bytes must be positive, got {budget_bytes}")
        self.store = store
        self.fingerprint = fingerprint
        self.budget_bytes = budget_bytes
        self.stats = CacheStats()
        self._entries: OrderedDict[str, CachedTree] = OrderedDict()
        self._loading: dict[str, asyncio.Future] = {}
        self._pool = ThreadPoolExecutor(max_workers=load_threads, thread_name_prefix="tree-load")

    def __contains__(self, doc_id: str) -> bool:
        return doc_id in self._entries

    def resident(self) -> list[str]:
        """Document ids in memory, least recently used first."""
        return list(self._entries)

    async def get(self, doc_id: str) -> CachedTree:
        """The document's trees, loading them on a miss. Raises the store's errors
        (NotFound, Corrupt, FingerprintMismatch) or TooLarge."""
        entry = self._entries.get(doc_id)
        if entry is not None:
            self._entries.move_to_end(doc_id)
            self.stats.hits += 1
            return entry
        task = self._loading.get(doc_id)
        if task is not None:
            self.stats.hits += 1  # joins the load in flight: one load serves every waiter
        else:
            self.stats.misses += 1
            task = asyncio.ensure_future(self._load_and_insert(doc_id))
            self._loading[doc_id] = task
        # shield: a waiter that goes away (client disconnect) does not cancel the shared load
        return await asyncio.shield(task)

    async def _load_and_insert(self, doc_id: str) -> CachedTree:
        try:
            entry = await asyncio.get_running_loop().run_in_executor(self._pool, self._load, doc_id)
        except Exception:
            self.stats.load_errors += 1
            raise
        finally:
            del self._loading[doc_id]
        self._insert(doc_id, entry)
        return entry

    def _load(self, doc_id: str) -> CachedTree:
        t0 = time.perf_counter()
        manifest = self.store.manifest(doc_id, self.fingerprint)
        if manifest.total_bytes > self.budget_bytes:
            raise TooLarge(f"document {doc_id!r} has {manifest.total_bytes} bytes of trees, more than the "
                           f"cache budget of {self.budget_bytes}")
        tree = self.store.load_tree(manifest)
        load_ms = 1000 * (time.perf_counter() - t0)
        return CachedTree(manifest=manifest, tree=tree, nbytes=tree.nbytes(), load_ms=load_ms)

    def _insert(self, doc_id: str, entry: CachedTree) -> None:
        self.stats.load_ms.append(entry.load_ms)
        self._entries[doc_id] = entry
        self.stats.bytes += entry.nbytes
        while self.stats.bytes > self.budget_bytes and len(self._entries) > 1:
            _, old = self._entries.popitem(last=False)
            self.stats.bytes -= old.nbytes
            self.stats.evictions += 1

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
