"""Tree objects round-trip bit-exactly; anything damaged is refused with a clear error."""

from __future__ import annotations

import struct

import pytest
import torch

from ctxtree.kernels.tree import TreeConfig, build_tree, concat_trees
from ctxtree.kernels.treefile import FORMAT_VERSION, CorruptTreeError, TreeShard, decode_shard, encode_shard, shard_tree


@pytest.fixture(scope="module")
def tree(tiny_model):
    cfg = TreeConfig(n_layers=2, chunk_len=32, height=3, keep=4, codec="bf16")
    ids = torch.randint(3, 97, (150,), generator=torch.Generator().manual_seed(7))  # ragged last chunk
    return build_tree(tiny_model, ids, cfg)


def assert_trees_identical(a, b):
    assert a.config == b.config and a.chunk_lengths == b.chunk_lengths and a.first_chunk == b.first_chunk
    for name in ("keys", "values", "routes", "node_offsets"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and torch.equal(x.view(torch.uint8) if x.dtype != torch.int64 else x,
                                                  y.view(torch.uint8) if y.dtype != torch.int64 else y), name


def test_round_trip_is_bit_exact(tree):
    shard = TreeShard("f" * 64, "doc-1", tree.n_tokens, tree.n_chunks, tree)
    data = encode_shard(shard)
    back = decode_shard(data)
    assert (back.fingerprint, back.doc_id, back.n_tokens, back.n_chunks_total) == ("f" * 64, "doc-1", 150, 5)
    assert_trees_identical(back.tree, tree)
    assert encode_shard(back) == data  # deterministic bytes


def test_shards_are_bounded_and_join_back(tree):
    per_chunk = tree.nbytes() // tree.n_chunks
    shards = shard_tree("f" * 64, "d", tree, tree.n_chunks, tree.n_tokens, max_shard_bytes=2 * per_chunk + 10)
    assert len(shards) >= 3
    assert all(s.tree.nbytes() <= 2 * per_chunk + 10 or s.tree.n_chunks == 1 for s in shards)
    decoded = [decode_shard(encode_shard(s)).tree for s in shards]
    assert [t.first_chunk for t in decoded] == sorted(t.first_chunk for t in decoded)
    assert_trees_identical(concat_trees(decoded), tree)
    with pytest.raises(ValueError, match="contiguous"):
        concat_trees([decoded[0], decoded[2]])


def test_damaged_objects_are_refused(tree):
    data = encode_shard(TreeShard("f" * 64, "doc", tree.n_tokens, tree.n_chunks, tree))
    with pytest.raises(CorruptTreeError, match="checksum"):
        decode_shard(data[:-100], "doc/0")
    with pytest.raises(CorruptTreeError, match="too short"):
        decode_shard(data[:20])
    for pos in (30, len(data) // 2, len(data) - 40, len(data) - 1):
        flipped = bytearray(data)
        flipped[pos] ^= 0x10
        with pytest.raises(CorruptTreeError, match="checksum"):
            decode_shard(bytes(flipped), "doc/0")
    with pytest.raises(CorruptTreeError, match="magic"):
        decode_shard(b"NOTATREE" + data[8:])
    newer = bytearray(data)
    newer[8:12] = struct.pack("<I", FORMAT_VERSION + 1)
    with pytest.raises(CorruptTreeError, match="version"):
        decode_shard(bytes(newer))


def test_consistent_checksum_but_bad_contents_is_refused(tree):
    import hashlib
    import json

    data = encode_shard(TreeShard("f" * 64, "doc", tree.n_tokens, tree.n_chunks, tree))
    head_len = struct.unpack_from("<I", data, 12)[0]
    header = json.loads(data[16:16 + head_len])
    header["chunk_end"] += 1  # lies about its chunk range
    head = json.dumps(header, sort_keys=True).encode()
    body = data[:12] + struct.pack("<I", len(head)) + head + data[16 + head_len:-32]
    with pytest.raises(CorruptTreeError, match="inconsistent"):
        decode_shard(body + hashlib.sha256(body).digest())
