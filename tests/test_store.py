"""The tree store, on a local directory and on S3 (a real moto server on loopback):
what is committed loads back bit-exactly with verified checksums, nothing half-written
is visible, and damage or a foreign fingerprint is an error."""

from __future__ import annotations

import os
import subprocess
import sys

import boto3
import pytest
import torch

from ctxtree.store import Corrupt, FingerprintMismatch, Manifest, NotFound, TreeStore, document_key
from ctxtree.kernels.tree import TreeConfig, build_tree
from ctxtree.kernels.treefile import shard_tree
from tests.conftest import REPO

FP = "a" * 64


@pytest.fixture(scope="module")
def s3_uri():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"]).create_bucket(Bucket="trees")
    yield "s3://trees/corpus-a"
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return TreeStore(str(tmp_path / "store"))
    uri = request.getfixturevalue("s3_uri")
    return TreeStore(f"{uri}/{request.node.name.replace('[', '-').strip(']')}")


@pytest.fixture(scope="module")
def tree(tiny_model):
    cfg = TreeConfig(n_layers=2, chunk_len=32, height=3, keep=4)
    return build_tree(tiny_model, torch.randint(3, 97, (140,), generator=torch.Generator().manual_seed(3)), cfg)


def write_document(store: TreeStore, doc_id: str, text: str, tree, max_shard_bytes=6000, commit=True) -> Manifest:
    key = document_key(text, FP)
    records = tuple(store.write_shard(key, s) for s in
                    shard_tree(FP, key, tree, tree.n_chunks, tree.n_tokens, max_shard_bytes))
    manifest = Manifest(doc_id=doc_id, key=key, fingerprint=FP, n_tokens=tree.n_tokens, n_chunks=tree.n_chunks,
                        tree_config=tree.config.to_dict(), shards=records)
    if commit:
        store.commit(manifest)
    return manifest


def test_committed_document_loads_back_bit_exactly(store, tree):
    written = write_document(store, "contracts/a.txt", "text of a", tree)
    assert len(written.shards) >= 2
    manifest = store.manifest("contracts/a.txt", FP)
    assert manifest == written and store.is_committed(FP, written.key)
    back = store.load_tree(manifest)
    for name in ("keys", "values", "routes", "node_offsets", "tokens", "key_scales", "value_scales"):
        assert torch.equal(getattr(back, name), getattr(tree, name)), name
    assert back.chunk_lengths == tree.chunk_lengths
    assert list(store.document_ids()) == ["contracts/a.txt"]


def test_uncommitted_document_is_invisible(store, tree):
    write_document(store, "b", "text of b", tree, commit=False)  # a crash after the shards
    with pytest.raises(NotFound, match="unknown document 'b'"):
        store.manifest("b")
    assert list(store.document_ids()) == []


def test_corrupt_shard_and_foreign_fingerprint_are_errors(store, tree):
    manifest = write_document(store, "c", "text of c", tree)
    with pytest.raises(FingerprintMismatch, match="recompress") as err:
        store.manifest("c", "b" * 64)
    assert f"codec={tree.config.codec}" in str(err.value)  # which settings serve it
    data = bytearray(store.objects.get(manifest.shards[1].name))
    data[len(data) // 2] ^= 1
    store.objects.put(manifest.shards[1].name, bytes(data))
    with pytest.raises(Corrupt, match="checksum"):
        store.load_tree(store.manifest("c", FP))
    store.objects.put(manifest.shards[0].name, b"short")
    with pytest.raises(Corrupt):
        store.load_tree(store.manifest("c", FP))


def test_ids_cannot_escape_the_store(tmp_path, tree):
    store = TreeStore(str(tmp_path / "inner"))
    write_document(store, "../../outside", "x", tree)
    assert store.manifest("../../outside").doc_id == "../../outside"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inner"]


def test_document_keys_are_identical_across_processes():
    script = "from ctxtree.store import document_key; print(document_key('same text \u00e9', 'f' * 64))"
    outs = {subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(REPO)}).stdout.strip()
            for seed in ("0", "77")}
    assert outs == {document_key("same text \u00e9", "f" * 64)}
    assert document_key("same text", "f" * 64) != document_key("same text", "e" * 64)


def test_bad_uri_is_refused():
    with pytest.raises(ValueError, match="unsupported URI"):
        TreeStore("ftp://host/x")
    with pytest.raises(ValueError, match="no bucket"):
        TreeStore("s3://")
