"""Compressing one document into the store: the unit of work of the Ray Data job and
of its plain in-process twin (the benchmark's baseline). No Ray here.

A long document is compressed and written chunk-batch by chunk-batch, so memory is
bounded by one batch of trees, never the whole document's. The manifest is written
last: until then nothing of the document is visible, and a re-run starts it over
(its shard names are deterministic, so the re-run overwrites any orphans).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ctxtree.prompt import document_tokens
from ctxtree.runtime import Runtime
from ctxtree.store import Manifest, TreeStore, document_key
from ctxtree.kernels.tree import build_tree
from ctxtree.kernels.treefile import shard_tree


@dataclass(frozen=True)
class CompressSettings:
    chunks_per_batch: int = 16             # chunks compressed (and held) at once per document
    max_shard_bytes: int = 32 * 2 ** 20    # upper bound of one tree object
    max_doc_bytes: int = 64 * 2 ** 20      # larger inputs are failures, checked before tokenizing
    max_doc_tokens: int = 4_000_000        # longer documents are failures

    def __post_init__(self) -> None:
        for name in ("chunks_per_batch", "max_shard_bytes", "max_doc_bytes", "max_doc_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


class BadDocument(ValueError):
    """A document that cannot be compressed (empty, binary, too large...): recorded, not fatal."""


@dataclass(frozen=True)
class DocResult:
    doc_id: str
    key: str
    status: str          # "committed" | "skipped" (already committed)
    tokens: int
    chunks: int
    bytes: int
    seconds: float


def decode_text(data: bytes | str, settings: CompressSettings) -> str:
    """The document's text, or BadDocument saying why it is not one."""
    size = len(data.encode("utf-8") if isinstance(data, str) else data)
    if size > settings.max_doc_bytes:
        raise BadDocument(f"too large: {size} bytes exceeds max_doc_bytes={settings.max_doc_bytes}")
    if isinstance(data, bytes):
        if b"\x00" in data[:65536]:
            raise BadDocument("binary: contains NUL bytes")
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise BadDocument(f"undecodable: not UTF-8 ({e.reason} at byte {e.start})") from None
    if not data.strip():
        raise BadDocument("empty document")
    return data


def tokenize(rt_tokenizer, text: str, settings: CompressSettings) -> list[int]:
    ids = document_tokens(rt_tokenizer, text)
    if not ids:  # e.g. only characters the tokenizer drops: a tree of no chunks cannot be read back
        raise BadDocument("no tokens: the tokenizer produced nothing from this text")
    if len(ids) > settings.max_doc_tokens:
        raise BadDocument(f"too long: {len(ids)} tokens exceeds max_doc_tokens={settings.max_doc_tokens}")
    return ids


def compress_tokens(rt: Runtime, store: TreeStore, doc_id: str, key: str, ids: list[int],
                    settings: CompressSettings) -> DocResult:
    """Write the trees of a tokenized document, then commit it. Skips committed ones."""
    t0 = time.perf_counter()
    fp = rt.fingerprint
    if store.is_committed(fp, key):
        # Already compressed (a re-run, or the same text under another id): at most the
        # id pointer is written, e.g. after a crash between manifest and pointer.
        m = store.manifest_for_key(fp, key)
        store.point(doc_id, fp, key)
        return DocResult(doc_id, key, "skipped", m.n_tokens, m.n_chunks, m.total_bytes, time.perf_counter() - t0)
    cfg = rt.tree_config
    n_chunks = -(-len(ids) // cfg.chunk_len)
    records = []
    for first in range(0, n_chunks, settings.chunks_per_batch):
        last = min(first + settings.chunks_per_batch, n_chunks)
        batch_ids = torch.tensor(ids[first * cfg.chunk_len:last * cfg.chunk_len], dtype=torch.long)
        tree = build_tree(rt.model, batch_ids, cfg, first_chunk=first)
        # Shards are content-addressed (shared by every id with this text): the header names the key.
        for shard in shard_tree(fp, key, tree, n_chunks, len(ids), settings.max_shard_bytes):
            records.append(store.write_shard(key, shard))
    manifest = Manifest(doc_id=doc_id, key=key, fingerprint=fp, n_tokens=len(ids), n_chunks=n_chunks,
                        tree_config=cfg.to_dict(), shards=tuple(records))
    store.commit(manifest)
    return DocResult(doc_id, key, "committed", len(ids), n_chunks, manifest.total_bytes, time.perf_counter() - t0)


def compress_document(rt: Runtime, store: TreeStore, doc_id: str, data: bytes | str,
                      settings: CompressSettings) -> DocResult:
    """Validate, tokenize and compress one document in this process."""
    text = decode_text(data, settings)
    key = document_key(text, rt.fingerprint)
    if store.is_committed(rt.fingerprint, key):
        return compress_tokens(rt, store, doc_id, key, [], settings)
    return compress_tokens(rt, store, doc_id, key, tokenize(rt.tokenizer, text, settings), settings)
