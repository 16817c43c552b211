"""Tree objects: one shard of a document's context trees as bytes, and back.

Layout (all integers little-endian):

    magic      8 bytes  b"CTXTREE\\0"
    version    u32      FORMAT_VERSION
    header_len u32
    header     JSON (utf-8): fingerprint, doc_id (in a store: the document key, since
               twins share shards), n_tokens (whole document),
               chunk_start/chunk_end, n_chunks_total, chunk_lengths, tree config,
               codec, payload_len, tensor shapes and dtypes
    payload    safetensors bytes: keys, values, routes, node_offsets, tokens, and for a
               quantized codec (int8, fp8) key_scales, value_scales
    checksum   32 bytes sha256 of everything above

Never pickle: objects come from storage and must not be able to execute code.
A truncated, bit-flipped or inconsistent object raises CorruptTreeError.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ctxtree.kernels.codec import CODECS, SCALE_DTYPE
from ctxtree.kernels.tree import ContextTree, TreeConfig, keep_per_node, kept_positions, node_spans, slice_tree

MAGIC = b"CTXTREE\x00"
# 2: + tokens (the chunks' token ids, for search). The quantized codecs' scales are
# two more tensors named by the codec, so version-2 bf16 objects written before them load.
FORMAT_VERSION = 2
_PREFIX = struct.Struct("<8sII")
_DIGEST = 32
_TENSORS = ("keys", "values", "routes", "node_offsets", "tokens")
_SCALES = ("key_scales", "value_scales")


class CorruptTreeError(ValueError):
    """A tree object that is not intact: wrong magic, version, checksum or contents."""


@dataclass
class TreeShard:
    """A decoded tree object: the chunks it covers and what the header says about them."""
    fingerprint: str
    doc_id: str
    n_tokens: int          # tokens of the whole document
    n_chunks_total: int    # chunks of the whole document
    tree: ContextTree      # chunks [tree.first_chunk, tree.first_chunk + tree.n_chunks)


def encode_shard(shard: TreeShard) -> bytes:
    return encode_shard_digest(shard)[0]


def encode_shard_digest(shard: TreeShard) -> tuple[bytes, str]:
    """The object's bytes and the sha256 of all of them (what a manifest records), in one
    pass over the bytes: the trailing checksum is the same hash stopped before itself."""
    tree = shard.tree
    tensors = {"keys": tree.keys.contiguous(), "values": tree.values.contiguous(),
               "routes": tree.routes.contiguous(), "node_offsets": tree.node_offsets.contiguous(),
               "tokens": tree.tokens.contiguous()}
    if tree.key_scales is not None and tree.value_scales is not None:
        tensors.update(key_scales=tree.key_scales.contiguous(), value_scales=tree.value_scales.contiguous())
    payload = st_save(tensors)
    header = {
        "fingerprint": shard.fingerprint, "doc_id": shard.doc_id, "n_tokens": shard.n_tokens,
        "n_chunks_total": shard.n_chunks_total, "chunk_start": tree.first_chunk,
        "chunk_end": tree.first_chunk + tree.n_chunks, "chunk_lengths": tree.chunk_lengths,
        "tree_config": tree.config.to_dict(), "codec": tree.config.codec, "payload_len": len(payload),
        "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
                    for k, v in tensors.items()},
    }
    head = json.dumps(header, sort_keys=True).encode()
    front = _PREFIX.pack(MAGIC, FORMAT_VERSION, len(head)) + head
    h = hashlib.sha256(front)
    h.update(payload)
    checksum = h.digest()  # sha256(body); the hash goes on over the checksum itself
    h.update(checksum)
    return b"".join((front, payload, checksum)), h.hexdigest()


def decode_shard(data: bytes, name: str = "tree object", sha256: str | None = None) -> TreeShard:
    """Parse and fully verify a tree object; `name` says which one in error messages.
    sha256: what a manifest recorded for the whole object (checked in the same pass)."""
    if len(data) < _PREFIX.size + _DIGEST:
        raise CorruptTreeError(f"{name}: {len(data)} bytes is too short to be a tree object (truncated?)")
    magic, version, head_len = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise CorruptTreeError(f"{name}: bad magic {magic!r}, expected {MAGIC!r}: not a ctxtree object")
    if version != FORMAT_VERSION:
        hint = "; it was written by an older ctxtree: compress the document again" if version < FORMAT_VERSION else ""
        raise CorruptTreeError(f"{name}: format version {version} is not supported (this build reads "
                               f"{FORMAT_VERSION}){hint}")
    view = memoryview(data)
    body, digest = view[:-_DIGEST], bytes(view[-_DIGEST:])
    h = hashlib.sha256(body)
    if h.digest() != digest:
        raise CorruptTreeError(f"{name}: checksum mismatch ({len(data)} bytes): the object is truncated or corrupted")
    if sha256 is not None:
        h.update(digest)
        if h.hexdigest() != sha256:
            raise CorruptTreeError(f"{name}: intact, but not the object its manifest records (checksum differs)")
    try:
        header = json.loads(bytes(body[_PREFIX.size:_PREFIX.size + head_len]))
        payload = bytes(body[_PREFIX.size + head_len:])  # the one copy: safetensors reads bytes
        if len(payload) != header["payload_len"]:
            raise CorruptTreeError(f"{name}: payload is {len(payload)} bytes, header says {header['payload_len']}")
        tensors = st_load(payload)
        config = TreeConfig.from_dict(header["tree_config"])
        scales = _SCALES if CODECS[config.codec].quantized else ()
        extra = set(tensors) - set(_TENSORS) - set(scales)
        if extra:
            raise CorruptTreeError(f"{name}: unexpected tensors {sorted(extra)} for codec {config.codec}")
        tree = ContextTree(config=config, chunk_lengths=[int(n) for n in header["chunk_lengths"]],
                           first_chunk=int(header["chunk_start"]),
                           **{k: tensors[k] for k in (*_TENSORS, *scales)})
        shard = TreeShard(fingerprint=header["fingerprint"], doc_id=header["doc_id"],
                          n_tokens=int(header["n_tokens"]), n_chunks_total=int(header["n_chunks_total"]),
                          tree=tree)
        _check_consistent(shard, header, name)
    except CorruptTreeError:
        raise
    except Exception as e:  # malformed JSON, missing keys or tensors, bad safetensors, wrong types
        raise CorruptTreeError(f"{name}: malformed contents: {type(e).__name__}: {e}") from e
    return shard


def _check_consistent(shard: TreeShard, header: dict, name: str) -> None:
    tree, cfg = shard.tree, shard.tree.config
    c, n = tree.n_chunks, cfg.n_nodes
    problems = []
    if header["chunk_end"] - header["chunk_start"] != c or c == 0:
        problems.append(f"chunk range {header['chunk_start']}..{header['chunk_end']} vs {c} chunk lengths")
    if tree.node_offsets.shape != (c * n + 1,) or tree.node_offsets.dtype != torch.int64:
        problems.append(f"node_offsets shape {tuple(tree.node_offsets.shape)}, expected ({c * n + 1},)")
    elif int(tree.node_offsets[0]) != 0 or bool((tree.node_offsets[1:] < tree.node_offsets[:-1]).any()):
        problems.append("node_offsets are not ascending from 0")
    elif int(tree.node_offsets[-1]) != tree.keys.shape[2]:
        problems.append(f"node_offsets end at {int(tree.node_offsets[-1])}, keys hold {tree.keys.shape[2]}")
    if tree.keys.shape != tree.values.shape or tree.keys.dim() != 4 or tree.keys.shape[0] != cfg.n_layers:
        problems.append(f"keys {tuple(tree.keys.shape)} / values {tuple(tree.values.shape)} do not match M={cfg.n_layers}")
    if tree.routes.dim() != 3 or tree.routes.shape[:2] != (c, n):
        problems.append(f"routes shape {tuple(tree.routes.shape)}, expected ({c}, {n}, D)")
    if tree.tokens.shape != (sum(tree.chunk_lengths),) or tree.tokens.dtype != torch.int32:
        problems.append(f"tokens shape {tuple(tree.tokens.shape)} {tree.tokens.dtype}, expected "
                        f"({sum(tree.chunk_lengths)},) int32")
    elif tree.tokens.numel() and int(tree.tokens.min()) < 0:
        problems.append("negative token ids")
    codec = CODECS[cfg.codec]
    if tree.keys.dtype != codec.dtype or tree.values.dtype != codec.dtype or tree.routes.dtype != codec.routes_dtype:
        problems.append(f"tensor dtypes do not match codec {cfg.codec}")
    for scales in (tree.key_scales, tree.value_scales) if codec.quantized else ():
        if scales is None or scales.shape != tree.keys.shape[:3] or scales.dtype != SCALE_DTYPE:
            problems.append(f"scales {None if scales is None else tuple(scales.shape)} do not match keys "
                            f"{tuple(tree.keys.shape)} ({SCALE_DTYPE} expected)")
            break
        if not bool(torch.isfinite(scales).all()):
            problems.append("non-finite scales")
            break
    last_of_doc = header["chunk_end"] == shard.n_chunks_total
    for i, length in enumerate(tree.chunk_lengths):
        is_last = last_of_doc and i == c - 1
        if not (1 <= length <= cfg.chunk_len) or (length != cfg.chunk_len and not is_last):
            problems.append(f"chunk {tree.first_chunk + i} has {length} tokens (chunk_len {cfg.chunk_len}); "
                            "only a document's last chunk may be shorter")
            break
    if not problems:
        want = torch.tensor([len(kept_positions(e - s, keep_per_node(length, cfg))) if e > s else 0
                             for length in tree.chunk_lengths
                             for s, e in node_spans(length, cfg.height)[1:]], dtype=torch.int64)
        if not torch.equal(tree.node_offsets[1:] - tree.node_offsets[:-1], want):
            problems.append("kept positions per node do not match the tree layout")
    if problems:
        raise CorruptTreeError(f"{name}: inconsistent contents: " + "; ".join(problems))


def chunk_nbytes(tree: ContextTree) -> list[int]:
    """slice_tree(tree, c, c + 1).nbytes() of every chunk c, from the layout (no copies)."""
    n = tree.config.n_nodes
    per_position = tree.bytes_per_position()
    per_chunk_fixed = (tree.routes[0].numel() * tree.routes.element_size()
                       + (n + 1) * tree.node_offsets.element_size())
    positions = tree.node_offsets[::n]
    return [int(positions[c + 1] - positions[c]) * per_position + per_chunk_fixed
            + length * tree.tokens.element_size() for c, length in enumerate(tree.chunk_lengths)]


def shard_tree(fingerprint: str, doc_id: str, tree: ContextTree, n_chunks_total: int, n_tokens: int,
               max_shard_bytes: int) -> list[TreeShard]:
    """Split into shards of consecutive chunks whose tensors stay under max_shard_bytes
    (a single chunk larger than that gets a shard of its own)."""
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    per_chunk = chunk_nbytes(tree)
    shards, start, size = [], 0, 0
    for c, nbytes in enumerate(per_chunk):
        if c > start and size + nbytes > max_shard_bytes:
            shards.append((start, c))
            start, size = c, 0
        size += nbytes
    shards.append((start, tree.n_chunks))
    # views, not copies: encoding a shard makes its one contiguous copy (none when one shard
    # holds the whole tree)
    return [TreeShard(fingerprint, doc_id, n_tokens, n_chunks_total, slice_tree(tree, s, e, copy=False))
            for s, e in shards]
