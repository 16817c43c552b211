"""Tree objects round-trip bit-exactly in every codec; objects written before the quantized
codecs still load; anything damaged is refused with a clear error."""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

import pytest
import torch

from ctxtree.kernels.tree import TreeConfig, build_tree, concat_trees, gather_nodes, slice_tree
from ctxtree.kernels.treefile import (FORMAT_VERSION, CorruptTreeError, TreeShard, chunk_nbytes, decode_shard,
                                      encode_shard, encode_shard_digest, shard_tree)

# A bf16 object written by ctxtree before the int8/fp8 codecs (commit 36665af; tiny model,
# M=2, L=32, h=3, p=4, 50 tokens).
OLD_BF16_OBJECT = Path(__file__).parent / "data" / "tree-v2-bf16.ctt"


@pytest.fixture(scope="module", params=["bf16", "int8", "fp8"])
def tree(tiny_model, request):
    cfg = TreeConfig(n_layers=2, chunk_len=32, height=3, keep=4, codec=request.param)
    ids = torch.randint(3, 97, (150,), generator=torch.Generator().manual_seed(7))  # ragged last chunk
    return build_tree(tiny_model, ids, cfg)


def assert_trees_identical(a, b):
    assert a.config == b.config and a.chunk_lengths == b.chunk_lengths and a.first_chunk == b.first_chunk
    for name in ("keys", "values", "routes", "node_offsets", "tokens", "key_scales", "value_scales"):
        x, y = getattr(a, name), getattr(b, name)
        if x is None or y is None:
            assert x is None and y is None, name
            continue
        assert x.dtype == y.dtype and torch.equal(x.view(torch.uint8) if x.element_size() <= 2 else x,
                                                  y.view(torch.uint8) if y.element_size() <= 2 else y), name


def test_objects_written_before_the_quantized_codecs_still_load():
    data = OLD_BF16_OBJECT.read_bytes()
    shard = decode_shard(data, "old")
    tree = shard.tree
    assert shard.doc_id == "old-doc" and tree.config.codec == "bf16" and tree.key_scales is None
    assert tree.keys.dtype == torch.bfloat16 and tree.n_tokens == 50
    g = gather_nodes(tree, torch.tensor([[2, 4, 7, 8]] * tree.n_chunks))
    k, v = g.keys, g.values
    assert k.dtype == torch.bfloat16 and k.shape[2] == v.shape[2] > 0 and torch.isfinite(k.float()).all()
    assert encode_shard(shard) == data  # and bf16 objects are still written byte for byte as before


def test_quantized_objects_without_scales_are_refused(tiny_model):
    from dataclasses import replace

    tree = build_tree(tiny_model, torch.arange(3, 70), TreeConfig(n_layers=2, chunk_len=32, height=3, keep=4))
    assert tree.config.codec == "int8" and tree.key_scales is not None
    data = encode_shard(TreeShard("f" * 64, "doc", tree.n_tokens, tree.n_chunks,
                                  replace(tree, key_scales=None, value_scales=None)))
    with pytest.raises(CorruptTreeError, match="malformed"):
        decode_shard(data, "doc/0")
    bad = tree.value_scales.clone()
    bad[0, 0, 0] = float("inf")
    with pytest.raises(CorruptTreeError, match="non-finite scales"):
        decode_shard(encode_shard(TreeShard("f" * 64, "doc", tree.n_tokens, tree.n_chunks,
                                            replace(tree, value_scales=bad))), "doc/0")


def test_round_trip_is_bit_exact(tree):
    shard = TreeShard("f" * 64, "doc-1", tree.n_tokens, tree.n_chunks, tree)
    data = encode_shard(shard)
    back = decode_shard(data)
    assert (back.fingerprint, back.doc_id, back.n_tokens, back.n_chunks_total) == ("f" * 64, "doc-1", 150, 5)
    assert_trees_identical(back.tree, tree)
    assert encode_shard(back) == data  # deterministic bytes
    again, digest = encode_shard_digest(back)
    assert again == data and digest == hashlib.sha256(data).hexdigest()  # what a manifest records
    decode_shard(data, "doc-1", sha256=digest)
    with pytest.raises(CorruptTreeError, match="not the object its manifest records"):
        decode_shard(data, "doc-1", sha256="0" * 64)


def test_shards_are_bounded_and_join_back(tree):
    assert chunk_nbytes(tree) == [slice_tree(tree, c, c + 1).nbytes() for c in range(tree.n_chunks)]
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
