"""Compressing one document into the store: the unit of work of the Ray Data job and
of its plain in-process twin (the benchmark's baseline). No Ray here.

A long document is compressed and written chunk-batch by chunk-batch, so memory is
bounded by one batch of trees, never the whole document's. The manifest is written
last: until then nothing of the document is visible, and a re-run starts it over.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ctxtree.prompt import document_tokens
from ctxtree.runtime import Runtime
from ctxtree.store import Manifest, TreeStore, document_key
from kernels.tree import build_tree
from kernels.treefile import shard_tree


@dataclass(frozen=True)
class CompressSettings:
    chunks_per_batch: int = 16             # chunks compressed (and held) at once per document
    max_shard_bytes: int = 32 * 2 ** 20    # upper bound of one tree object
    max_doc_tokens: int = 4_000_000        # longer documents are recorded as failures

    def __post_init__(self) -> None:
        if self.chunks_per_batch < 1:
            raise ValueError(f"chunks_per_batch must be >= 1, got {self.chunks_per_batch}")
        if self.max_shard_bytes < 1:
            raise ValueError(f"max_shard_bytes must be >= 1, got {self.max_shard_bytes}")
        if self.max_doc_tokens < 1:
            raise ValueError(f"max_doc_tokens must be >= 1, got {self.max_doc_tokens}")


class BadDocument(ValueError):
    """A document that cannot be compressed (empty, too long, ...): recorded, not fatal."""


@dataclass(frozen=True)
class DocResult:
    doc_id: str
    key: str
    status: str          # "committed" | "skipped" (already committed)
    tokens: int
    chunks: int
    bytes: int
    seconds: float


def compress_document(rt: Runtime, store: TreeStore, doc_id: str, text: str,
                      settings: CompressSettings) -> DocResult:
    t0 = time.perf_counter()
    fp = rt.fingerprint
    key = document_key(text, fp)
    if store.is_committed(fp, key):
        # Already compressed (a re-run, or the same text under another id): at most the
        # id pointer is written, e.g. after a crash between manifest and pointer.
        m = store.manifest_for_key(fp, key)
        store.point(doc_id, fp, key)
        return DocResult(doc_id, key, "skipped", m.n_tokens, m.n_chunks, m.total_bytes, time.perf_counter() - t0)
    if not text.strip():
        raise BadDocument("empty document")
    ids = document_tokens(rt.tokenizer, text)
    if len(ids) > settings.max_doc_tokens:
        raise BadDocument(f"{len(ids)} tokens exceeds max_doc_tokens={settings.max_doc_tokens}")
    cfg = rt.tree_config
    n_chunks = -(-len(ids) // cfg.chunk_len)
    records = []
    for first in range(0, n_chunks, settings.chunks_per_batch):
        last = min(first + settings.chunks_per_batch, n_chunks)
        batch_ids = torch.tensor(ids[first * cfg.chunk_len:last * cfg.chunk_len])
        tree = build_tree(rt.model, batch_ids, cfg, first_chunk=first)
        for shard in shard_tree(fp, doc_id, tree, n_chunks, len(ids), settings.max_shard_bytes):
            records.append(store.write_shard(key, shard))
    manifest = Manifest(doc_id=doc_id, key=key, fingerprint=fp, n_tokens=len(ids), n_chunks=n_chunks,
                        tree_config=cfg.to_dict(), shards=tuple(records))
    store.commit(manifest)
    return DocResult(doc_id, key, "committed", len(ids), n_chunks, manifest.total_bytes, time.perf_counter() - t0)
