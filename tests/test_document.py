"""One document into the store, chunk-batch by chunk-batch, with the real default model:
trees equal those built in one piece, a re-run is a no-op, bad documents are refused."""

from __future__ import annotations

import pytest
import torch

from ctxtree.kernels.codec import decode_kv
from ctxtree.prompt import document_tokens
from ctxtree.store import NotFound, TreeStore
from ctxtree.kernels.tree import TreeConfig, build_tree
from ctxtree.pipelines.document import BadDocument, CompressSettings, compress_document
from tests.conftest import REPO

TEXT = (REPO / "samples" / "GPL-3.txt").read_text()[:12000]


@pytest.fixture(scope="module")
def small_rt(smollm_dir):
    from ctxtree.runtime import load_runtime

    return load_runtime(smollm_dir, TreeConfig(n_layers=2, chunk_len=256, height=3, keep=8))


def test_chunk_batches_equal_one_piece_and_rerun_is_a_noop(small_rt, tmp_path):
    store = TreeStore(str(tmp_path / "s"))
    settings = CompressSettings(chunks_per_batch=3, max_shard_bytes=40_000)
    res = compress_document(small_rt, store, "gpl", TEXT, settings)
    assert res.status == "committed" and res.chunks == -(-res.tokens // 256)
    manifest = store.manifest("gpl", small_rt.fingerprint)
    assert len(manifest.shards) >= res.chunks // 3
    ids = document_tokens(small_rt.tokenizer, TEXT)
    whole = build_tree(small_rt.model, torch.tensor(ids), small_rt.tree_config)
    back = store.load_tree(manifest)
    assert torch.equal(back.node_offsets, whole.node_offsets) and back.chunk_lengths == whole.chunk_lengths
    torch.testing.assert_close(back.routes, whole.routes)  # bf16: batching may move a value by one rounding step
    for codes, scales in (("keys", "key_scales"), ("values", "value_scales")):  # int8: or a code by one step
        got, want = (decode_kv(getattr(t, codes), getattr(t, scales)) for t in (back, whole))
        torch.testing.assert_close(got, want, rtol=0.02, atol=2 * float(getattr(whole, scales).float().max()))
    before = sorted(store.objects.list(""))
    again = compress_document(small_rt, store, "gpl", TEXT, settings)
    assert again.status == "skipped" and sorted(store.objects.list("")) == before
    # the same text under another id shares the trees: only a pointer and the binding of
    # the id to the trees are added
    twin = compress_document(small_rt, store, "gpl-copy", TEXT, settings)
    assert twin.status == "skipped" and twin.key == res.key
    assert len(list(store.objects.list(""))) == len(before) + 2
    assert store.manifest("gpl-copy").doc_id == "gpl-copy"


def test_bad_documents_are_refused_and_leave_nothing(small_rt, tmp_path):
    store = TreeStore(str(tmp_path / "s"))
    with pytest.raises(BadDocument, match="empty"):
        compress_document(small_rt, store, "empty", " \n\t", CompressSettings())
    with pytest.raises(BadDocument, match="exceeds max_doc_tokens"):
        compress_document(small_rt, store, "long", TEXT, CompressSettings(max_doc_tokens=100))
    assert list(store.objects.list("")) == []
    with pytest.raises(NotFound):
        store.manifest("long")


@pytest.mark.parametrize("data,reason", [(b"\x00\x01binary\x00", "binary"), (b"caf\xe9 latin-1", "undecodable"),
                                         ("   ", "empty"), ("x" * 2000, "too large")])
def test_decode_text_says_why(data, reason):
    from ctxtree.pipelines.document import decode_text

    with pytest.raises(BadDocument, match=reason):
        decode_text(data, CompressSettings(max_doc_bytes=1000))
