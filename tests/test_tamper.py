"""Consistent tampering: objects whose checksums and sizes were kept consistent but that
belong to another document, or disagree with each other, are Corrupt, never an answer.
Each case below was served as a good document before the store bound its objects to
one another (issue 16); a seeded fuzz then mixes the cases with byte flips."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import shutil
import time
from pathlib import Path

import pytest
import torch

from ctxtree.kernels.tree import TreeConfig, build_tree
from ctxtree.kernels.treefile import decode_shard, encode_shard
from ctxtree.store import StoreError, TreeStore
from tests.test_store import FP, write_document

CFG = TreeConfig(n_layers=2, chunk_len=32, height=3, keep=4)
DOCS = {"a.txt": (140, 3), "b.txt": (110, 4)}   # id: (tokens, seed)


@pytest.fixture(scope="module")
def pristine(tiny_model, tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("tamper") / "store"
    store, trees = TreeStore(str(root)), {}
    for doc_id, (n, seed) in DOCS.items():
        trees[doc_id] = build_tree(tiny_model, torch.randint(3, 97, (n,), generator=torch.Generator().manual_seed(seed)),
                                   CFG)
        manifest = write_document(store, doc_id, f"text of {doc_id}", trees[doc_id], max_shard_bytes=6000)
        assert len(manifest.shards) >= 3  # a document of several shards
    return root, trees


@pytest.fixture
def copy(pristine, tmp_path) -> tuple[TreeStore, Path, dict]:
    root, trees = pristine
    shutil.copytree(root, tmp_path / "store")
    return TreeStore(str(tmp_path / "store")), tmp_path / "store", trees


def objects(root: Path, doc_id: str) -> dict:
    """Paths of a document's id pointer and manifest, and its manifest's JSON."""
    pointer_path = root / TreeStore.id_key(doc_id)
    pointer = json.loads(pointer_path.read_text())
    manifest_path = root / TreeStore.manifest_key(pointer["fingerprint"], pointer["key"])
    return {"pointer": pointer_path, "manifest": manifest_path, "m": json.loads(manifest_path.read_text())}


def rewrite_header(root: Path, manifest: dict, index: int, **fields) -> None:
    """Give shard `index` a new header, re-checksummed, and record its size and sha256 in
    the manifest: consistent to every checksum."""
    record = manifest["shards"][index]
    path = root / record["name"]
    data = encode_shard(dataclasses.replace(decode_shard(path.read_bytes()), **fields))
    path.write_bytes(data)
    record["bytes"], record["sha256"] = len(data), hashlib.sha256(data).hexdigest()


def served(store: TreeStore, doc_id: str):
    return store.load_tree(store.manifest(doc_id, FP))


def same_tree(a, b) -> bool:
    return a.chunk_lengths == b.chunk_lengths and a.first_chunk == b.first_chunk and a.config == b.config and \
        all(torch.equal(getattr(a, t), getattr(b, t)) for t in ("keys", "values", "routes", "tokens", "node_offsets"))


def test_untouched_store_serves_both_documents(copy):
    store, _, trees = copy
    for doc_id, tree in trees.items():
        assert same_tree(served(store, doc_id), tree)


def test_manifest_given_another_documents_shards(copy):
    store, root, _ = copy
    a, b = objects(root, "a.txt"), objects(root, "b.txt")
    a["m"]["shards"], a["m"]["n_chunks"], a["m"]["n_tokens"] = b["m"]["shards"], b["m"]["n_chunks"], b["m"]["n_tokens"]
    a["manifest"].write_text(json.dumps(a["m"]))
    with pytest.raises(StoreError, match="not stored under its own key"):
        served(store, "a.txt")


def test_id_pointer_replaced_by_another_documents_pointer(copy):
    store, root, _ = copy
    objects(root, "a.txt")["pointer"].write_bytes(objects(root, "b.txt")["pointer"].read_bytes())
    with pytest.raises(StoreError, match="another document"):
        served(store, "a.txt")
    # the other's pointer, rewritten to claim our id: the trees were not committed for it
    pointer = json.loads(objects(root, "b.txt")["pointer"].read_text())
    objects(root, "a.txt")["pointer"].write_text(json.dumps({**pointer, "doc_id": "a.txt"}))
    with pytest.raises(StoreError, match="committed for another document"):
        served(store, "a.txt")


def test_twins_share_trees_and_each_id_is_bound(copy):
    """Identical text under a second id: served, because its binding records the commit."""
    store, root, trees = copy
    b = objects(root, "b.txt")["m"]
    store.point("b-copy.txt", b["fingerprint"], b["key"])
    assert same_tree(served(store, "b-copy.txt"), trees["b.txt"])
    (root / TreeStore.binding_key(b["fingerprint"], b["key"], "b-copy.txt")).unlink()
    with pytest.raises(StoreError, match="committed for another document"):
        served(store, "b-copy.txt")


@pytest.mark.parametrize("where,field", [("pointer", "key"), ("pointer", "doc_id"), ("manifest", "key"),
                                         ("shard", "name")])
def test_fields_of_the_wrong_type_are_corruption_not_a_crash(copy, where, field):
    from ctxtree.store import Corrupt

    store, root, _ = copy
    a = objects(root, "a.txt")
    if where == "pointer":
        pointer = json.loads(a["pointer"].read_text())
        pointer[field] = ["not", "a", "string"]
        a["pointer"].write_text(json.dumps(pointer))
    else:
        (a["m"]["shards"][0] if where == "shard" else a["m"])[field] = {"not": "a string"}
        a["manifest"].write_text(json.dumps(a["m"]))
    with pytest.raises(Corrupt):
        served(store, "a.txt")


def test_manifest_truncated_to_fewer_shards(copy):
    store, root, _ = copy
    a = objects(root, "a.txt")
    dropped = a["m"]["shards"].pop()
    a["m"]["n_chunks"] = dropped["chunk_start"]
    a["manifest"].write_text(json.dumps(a["m"]))
    with pytest.raises(StoreError):
        served(store, "a.txt")
    # also with n_tokens cut to fit the fewer chunks: the shards' headers still disagree
    a["m"]["n_tokens"] = a["m"]["n_chunks"] * CFG.chunk_len
    a["manifest"].write_text(json.dumps(a["m"]))
    with pytest.raises(StoreError, match="header does not match"):
        served(store, "a.txt")


@pytest.mark.parametrize("field,value", [("n_tokens", 999999), ("chunk_len", 1024)])
def test_manifest_totals_and_settings_must_match_the_shards(copy, field, value):
    store, root, _ = copy
    a = objects(root, "a.txt")
    (a["m"]["tree_config"] if field == "chunk_len" else a["m"])[field] = value
    a["manifest"].write_text(json.dumps(a["m"]))
    with pytest.raises(StoreError):
        store.manifest("a.txt", FP)   # refused before any shard is read (what /v1/documents reports)


def test_manifest_settings_changed_where_the_totals_still_fit(copy):
    store, root, _ = copy
    a = objects(root, "a.txt")
    a["m"]["tree_config"]["keep"] = 8
    a["manifest"].write_text(json.dumps(a["m"]))
    with pytest.raises(StoreError, match="header does not match"):
        served(store, "a.txt")


@pytest.mark.parametrize("fields", [{"doc_id": "b"}, {"n_tokens": 110}, {"doc_id": "b", "n_tokens": 110},
                                    {"n_chunks_total": 4}])
def test_shard_header_of_another_document_rechecksummed(copy, fields):
    """The header's doc_id field holds the document key (twins share shards)."""
    store, root, _ = copy
    a, b = objects(root, "a.txt"), objects(root, "b.txt")
    fields = {k: b["m"]["key"] if v == "b" else v for k, v in fields.items()}
    rewrite_header(root, a["m"], 1, **fields)
    a["manifest"].write_text(json.dumps(a["m"]))
    with pytest.raises(StoreError, match="header does not match"):
        served(store, "a.txt")


# --- fuzz ------------------------------------------------------------------------------

def mutate(rng: random.Random, root: Path) -> str:
    """One seeded mutation of the store; returns what it did."""
    doc, other = rng.sample(sorted(DOCS), 2)
    mine, theirs = objects(root, doc), objects(root, other)
    kind = rng.choice(["flip", "truncate", "manifest_field", "shard_field", "pointer_swap", "shard_swap",
                       "record_field"])
    if kind in ("flip", "truncate"):
        path = rng.choice([mine["pointer"], mine["manifest"]] + [root / s["name"] for s in mine["m"]["shards"]])
        data = bytearray(path.read_bytes())
        if kind == "flip":
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
        else:
            del data[rng.randrange(len(data)):]
        path.write_bytes(bytes(data))
        return f"{kind} {path.name}"
    if kind == "manifest_field":
        field = rng.choice(["n_tokens", "n_chunks", "doc_id", "key", "shards", "tree_config"])
        mine["m"][field] = theirs["m"][field] if rng.random() < 0.7 else \
            (mine["m"][field] + rng.choice([-1, 1]) if isinstance(mine["m"][field], int) else theirs["m"][field])
    elif kind == "record_field":
        record = rng.choice(mine["m"]["shards"])
        field = rng.choice(["chunk_start", "chunk_end", "name"])
        record[field] = rng.choice(theirs["m"]["shards"])[field]
    elif kind == "shard_field":
        field = rng.choice(["doc_id", "n_tokens", "n_chunks_total", "fingerprint"])
        value = {"doc_id": theirs["m"]["key"], "n_tokens": theirs["m"]["n_tokens"], "n_chunks_total": theirs["m"]["n_chunks"],
                 "fingerprint": "b" * 64}[field]
        rewrite_header(root, mine["m"], rng.randrange(len(mine["m"]["shards"])), **{field: value})
    elif kind == "pointer_swap":
        pointer = json.loads(theirs["pointer"].read_text())
        if rng.random() < 0.5:
            pointer["doc_id"] = doc   # the other's key, claiming to be ours
        mine["pointer"].write_text(json.dumps(pointer))
        return kind
    elif kind == "shard_swap":  # another document's shard bytes under our name, recorded consistently
        i = rng.randrange(len(mine["m"]["shards"]))
        src = rng.choice(theirs["m"]["shards"])
        shutil.copy(root / src["name"], root / mine["m"]["shards"][i]["name"])
        mine["m"]["shards"][i].update(bytes=src["bytes"], sha256=src["sha256"])
    mine["manifest"].write_text(json.dumps(mine["m"]))
    return kind


def test_seeded_tamper_fuzz_never_answers_from_a_mismatched_object(pristine, tmp_path):
    root, trees = pristine
    rng, refused, equal, started = random.Random(16), 0, 0, time.monotonic()
    for i in range(300):
        if time.monotonic() - started > 120:
            break
        work = tmp_path / f"m{i}"
        shutil.copytree(root, work)
        what = mutate(rng, work)
        store = TreeStore(str(work))
        for doc_id, tree in trees.items():
            try:
                got = served(store, doc_id)
            except StoreError:
                refused += 1
                continue
            assert same_tree(got, tree), f"mutation {i} ({what}) served {doc_id} from a mismatched object"
            equal += 1
        shutil.rmtree(work)
    print(f"tamper fuzz: {i + 1} mutations, {refused} loads refused, {equal} served unchanged, "
          f"{time.monotonic() - started:.1f} s")
    assert i >= 100 and refused >= i // 2, (i, refused, equal)
