"""Compressed chunks for training, built once and kept on disk.

Trees are per-chunk independent (method.md §3), so a training document of n chunks is
assembled from n already-compressed chunks: plain haystack chunks (cached by their
position in the haystack) and needle chunks (a haystack chunk with facts overwritten
into it, cached by pool index). A training step then costs only the decoder's forward
and backward pass; compression is paid once per chunk, not once per step.

Chunks are stored in the tree-object format (ctxtree/kernels/treefile.py: checksummed,
safetensors payload, never pickled) under <pool_dir>/<fingerprint[:16]>/, written
atomically, so several workers and a resumed run share them safely.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor

from ctxtree.kernels.llama import Llama
from ctxtree.kernels.tree import ContextTree, TreeConfig, build_tree, concat_trees, injected_chunks
from ctxtree.kernels.treefile import CorruptTreeError, TreeShard, decode_shard, encode_shard
from ctxtree.pipelines.data import Fact, Haystack, NeedleChunk, make_needle_chunk


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class ChunkCache:
    """Single-chunk trees by name, in memory once loaded, on disk across runs."""

    def __init__(self, cache_dir: Path, fingerprint: str, model: Llama, cfg: TreeConfig, in_memory: int = 2048):
        self.dir = Path(cache_dir) / fingerprint[:16]
        self.fingerprint, self.model, self.cfg = fingerprint, model, cfg
        self._trees: OrderedDict[str, ContextTree] = OrderedDict()  # LRU of at most in_memory trees
        self.in_memory = in_memory
        self.built = 0  # chunks compressed by this process (the rest came from disk)

    def tree(self, name: str, tokens: list[int]) -> ContextTree:
        if name in self._trees:
            self._trees.move_to_end(name)
            return self._trees[name]
        path = self.dir / f"{name}.ctt"
        # the file is only reused for exactly these tokens (a changed generator rebuilds it)
        content_id = f"{name}:{hashlib.sha256(str(tokens).encode()).hexdigest()[:16]}"
        tree = None
        if path.is_file():
            try:
                shard = decode_shard(path.read_bytes(), str(path))
                if shard.fingerprint == self.fingerprint and shard.doc_id == content_id:
                    tree = shard.tree
            except CorruptTreeError:
                tree = None  # a torn or stale file: rebuild it
        if tree is None:
            tree = build_tree(self.model, torch.tensor(tokens), self.cfg)
            _atomic_write(path, encode_shard(TreeShard(self.fingerprint, content_id, len(tokens), 1, tree)))
            self.built += 1
        self._trees[name] = tree
        if len(self._trees) > self.in_memory:
            self._trees.popitem(last=False)
        return tree

    def document(self, tokens: list[int]) -> ContextTree:
        """A whole document's tree, chunk by chunk through the cache (chunks are independent)."""
        L = self.cfg.chunk_len
        chunks = [tokens[i:i + L] for i in range(0, len(tokens), L)]
        return assemble([self.tree("c-" + hashlib.sha256(str(c).encode()).hexdigest()[:24], c) for c in chunks])


class ChunkPool:
    """Haystack and needle chunk trees of one split, for training."""

    def __init__(self, cache: ChunkCache, tokenizer, haystack: Haystack, seed: int,
                 digits: tuple[int, int] = (2, 6), facts_per_chunk: int = 4, needle_len: int = 0,
                 haystack_chunks: int = 0, value_kinds: tuple[str, ...] = ("digits",)):
        self.cache, self.tokenizer, self.cfg = cache, tokenizer, cache.cfg
        # haystack chunks drawn from (0 = all): fewer means fewer one-time compressions,
        # which dominate the first hours of a run with long documents and short chunks
        self.haystack_chunks = haystack_chunks
        self.haystack, self.seed, self.digits, self.facts_per_chunk = haystack, seed, digits, facts_per_chunk
        self.value_kinds = tuple(value_kinds)
        # needle chunks shorter than L are one-chunk documents (only a last chunk may be short)
        self.needle_len = needle_len or self.cfg.chunk_len
        self._needles: dict[int, tuple[list[int], list[Fact], list[str], list[int]]] = {}  # tokens, facts, questions, value positions

    @property
    def built(self) -> int:
        return self.cache.built

    @property
    def n_haystack_chunks(self) -> int:
        available = len(self.haystack) // self.cfg.chunk_len
        return min(available, self.haystack_chunks) if self.haystack_chunks else available

    def haystack_chunk(self, index: int) -> ContextTree:
        L = self.cfg.chunk_len
        return self.cache.tree(f"{self.haystack.label}-hay-{index:06d}", self.haystack.tokens[index * L:(index + 1) * L])

    def needle_name(self, index: int) -> str:
        """The cache name of needle chunk `index`: it says everything its tokens depend on."""
        name = f"{self.haystack.label}-needle-{self.seed}-{self.digits[0]}-{self.digits[1]}-{index:06d}"
        if (self.needle_len, self.facts_per_chunk) != (self.cfg.chunk_len, 4):
            name += f"-n{self.needle_len}-f{self.facts_per_chunk}"
        if self.value_kinds != ("digits",):
            name += "-v-" + "-".join(self.value_kinds)  # whole names: "digits" and "date" share a letter
        return name

    def needle_chunk(self, index: int) -> tuple[ContextTree, list[Fact], list[str], list[int]]:
        """The tree, facts, per-fact questions and value positions of needle chunk `index`."""
        name = self.needle_name(index)
        if index not in self._needles:
            meta_path = self.cache.dir / f"{name}.json"
            chunk: NeedleChunk = make_needle_chunk(self.tokenizer, self.haystack, index, self.seed,
                                                   self.needle_len, self.facts_per_chunk, self.digits,
                                                   self.value_kinds)
            self._needles[index] = (chunk.tokens, chunk.facts, chunk.questions, chunk.value_positions)
            tree = self.cache.tree(name, chunk.tokens)
            if not meta_path.is_file():  # for people inspecting the pool; never read back
                _atomic_write(meta_path, json.dumps({"facts": [f.__dict__ for f in chunk.facts],
                                                     "questions": chunk.questions}, indent=1).encode())
            return tree, chunk.facts, chunk.questions, chunk.value_positions
        tokens, facts, questions, value_positions = self._needles[index]
        return self.cache.tree(name, tokens), facts, questions, value_positions


def assemble(chunks: list[ContextTree]) -> ContextTree:
    """One document's tree from single-chunk trees, in order (chunk indices renumbered)."""
    renumbered = [replace(t, first_chunk=i) for i, t in enumerate(chunks)]
    return concat_trees(renumbered)


def assemble_index(chunks: list[ContextTree]) -> ContextTree:
    """What search reads of the document assemble() would give (tokens, node layout,
    routes), without the K/V: those are joined later for the few chunks search keeps
    (assemble_selected). Joining every chunk's K/V cost a 32-chunk training document
    ~26 ms (22 MB copied) of which 2 chunks are injected: most of a GPU step."""
    def no_positions(x: Tensor | None) -> Tensor | None:  # [M, Hkv, P, ...] -> [M, Hkv, 0, ...]
        return None if x is None else x[:, :, :0]

    def no_kv(t: ContextTree) -> ContextTree:
        return replace(t, keys=no_positions(t.keys), values=no_positions(t.values),
                       key_scales=no_positions(t.key_scales), value_scales=no_positions(t.value_scales))

    return assemble([no_kv(t) for t in chunks])


def assemble_selected(chunks: list[ContextTree], selection: Tensor) -> tuple[ContextTree, Tensor]:
    """The tree of only the chunks `selection` [C, h+1] injects, and its selection: the
    decoder's input is the same as from the whole document's tree (the K/V, tokens and
    chunk order it gathers; chunk positions count among the injected chunks only,
    ctxtree/kernels/inject.py request_kv)."""
    kept = injected_chunks(selection)
    return assemble([chunks[int(c)] for c in kept]), selection[kept]
