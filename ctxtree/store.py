"""The tree store: context trees in a local directory or in S3-compatible object
storage, through one code path (pyarrow filesystems).

Layout under the store root (design.md "Contracts"):

    ids/<h[:2]>/<h>.json                     h = sha256(document id): {doc_id, key, fingerprint}
    <fingerprint>/manifests/<k[:2]>/<k>.json  k = document key (content address)
    <fingerprint>/trees/<k[:2]>/<k>/<first chunk:08d>-<sha256[:16]>.ctt   tree objects (shards)
    <fingerprint>/runs/<run id>/{summary.json,failures.jsonl}          job records

Write order is the commit protocol: shards, then the manifest (sizes and sha256 of
every shard), then the id pointer. A reader only ever starts from a manifest or a
pointer, so a crash at any point leaves no half-written document visible; shards
without a manifest are orphans a later run overwrites. Document ids are hashed
into keys, so no id can address an object outside the store.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Iterator
from urllib.parse import urlparse

import pyarrow.fs as pafs

from ctxtree.kernels.tree import ContextTree, concat_trees
from ctxtree.kernels.treefile import CorruptTreeError, TreeShard, decode_shard, encode_shard_digest

MANIFEST_VERSION = 1


class StoreError(Exception):
    """Base of the store's errors. `doc_id` names the document being read when the error
    met it (set by TreeStore.manifest and load_tree), so a server can report the document
    and the kind of problem without the object's location (ctxtree/serve/protocol.py)."""

    doc_id: str | None = None


class NotFound(StoreError):
    pass


class UnknownDocument(NotFound):
    """No id pointer: the document id was never committed to this store."""


class Corrupt(StoreError):
    """An object whose bytes do not match what its manifest recorded, or do not parse."""


LOAD_THREADS = 4  # shards of one document fetched and verified at once


class FingerprintMismatch(StoreError):
    """The document was compressed under another model fingerprint."""


@contextlib.contextmanager
def _about(doc_id: str):
    """Tag a StoreError raised inside with the document being read."""
    try:
        yield
    except StoreError as e:
        if e.doc_id is None:
            e.doc_id = doc_id
        raise


def document_key(text: str, fingerprint: str) -> str:
    """Content address of a document's trees: sha256 of its text and the fingerprint.
    Identical in every process and on every machine (no Python hash())."""
    text_digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return hashlib.sha256(f"ctxtree-doc-v1|{fingerprint}|{text_digest}".encode()).hexdigest()


def _id_hash(doc_id: str) -> str:
    return hashlib.sha256(doc_id.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class ShardRecord:
    name: str
    chunk_start: int
    chunk_end: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    doc_id: str
    key: str
    fingerprint: str
    n_tokens: int
    n_chunks: int
    tree_config: dict
    shards: tuple[ShardRecord, ...]

    @property
    def total_bytes(self) -> int:
        return sum(s.bytes for s in self.shards)

    def to_json(self) -> bytes:
        doc = {"format": "ctxtree-manifest", "version": MANIFEST_VERSION, **asdict(self),
               "shards": [asdict(s) for s in self.shards]}
        return json.dumps(doc, indent=1, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes, name: str) -> "Manifest":
        try:
            doc = json.loads(data)
            if doc.get("format") != "ctxtree-manifest" or doc.get("version") != MANIFEST_VERSION:
                raise ValueError(f"not a version-{MANIFEST_VERSION} ctxtree manifest")
            shards = tuple(ShardRecord(**s) for s in doc["shards"])
            m = cls(doc_id=doc["doc_id"], key=doc["key"], fingerprint=doc["fingerprint"],
                    n_tokens=int(doc["n_tokens"]), n_chunks=int(doc["n_chunks"]),
                    tree_config=doc["tree_config"], shards=shards)
            covered = [c for s in shards for c in range(int(s.chunk_start), int(s.chunk_end))]
            chunk_len = int(m.tree_config["chunk_len"])
            # a tampered field of the wrong type is corruption, not a server error
            if not all(isinstance(v, str) for v in (m.doc_id, m.key, m.fingerprint, *(s.name for s in shards))):
                raise TypeError("doc_id, key, fingerprint and shard names must be strings")
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise Corrupt(f"{name}: malformed manifest: {e}") from e
        if covered != list(range(m.n_chunks)):
            raise Corrupt(f"{name}: shards do not cover chunks 0..{m.n_chunks - 1} exactly once")
        # Totals must fit the chunks: every chunk holds chunk_len tokens but the last.
        if m.n_chunks < 1 or not (m.n_chunks - 1) * chunk_len < m.n_tokens <= m.n_chunks * chunk_len:
            raise Corrupt(f"{name}: {m.n_tokens} tokens cannot fill {m.n_chunks} chunks of {chunk_len}")
        # Shards are content-addressed under the document's key: a manifest cannot borrow
        # another document's shards.
        home = f"{m.fingerprint}/trees/{m.key[:2]}/{m.key}/"
        if any(not s.name.startswith(home) or "/" in s.name[len(home):] for s in shards):
            raise Corrupt(f"{name}: lists a shard that is not stored under its own key")
        return m


def filesystem_for(uri: str, endpoint_url: str | None = None) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path within it) for a local path, file://... or s3://bucket/prefix.

    The S3 endpoint comes from endpoint_url, else the standard AWS_ENDPOINT_URL_S3 /
    AWS_ENDPOINT_URL variables (MinIO, Ceph RGW, moto), else AWS itself; credentials
    and region from the standard AWS variables and files.
    """
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise ValueError(f"store URI {uri!r} has no bucket")
        endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        kwargs: dict = {}
        if endpoint:
            ep = urlparse(endpoint)
            kwargs = {"endpoint_override": ep.netloc or ep.path, "scheme": ep.scheme or "https"}
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        return pafs.S3FileSystem(region=region, **kwargs), f"{parsed.netloc}/{parsed.path.strip('/')}".rstrip("/")
    if parsed.scheme in ("", "file"):
        return pafs.LocalFileSystem(), os.path.abspath(parsed.path if parsed.scheme == "file" else uri)
    raise ValueError(f"unsupported URI {uri!r}: use a local path, file://... or s3://bucket/prefix")


class ObjectStore:
    """A few typed verbs over a pyarrow filesystem: put, get, head, list, delete.

    pyarrow covers every verb on local disks and S3 alike, so boto3 is not needed here
    (tests use it only to create buckets on the moto server). Where pyarrow falls short
    is conditional writes (S3 If-None-Match): the commit protocol does not rely on them,
    because every object name is either content-addressed or rewritten idempotently.
    """

    def __init__(self, uri: str, endpoint_url: str | None = None):
        self.fs, self.root = filesystem_for(uri, endpoint_url)
        self.local = isinstance(self.fs, pafs.LocalFileSystem)
        if self.local:
            os.makedirs(self.root, exist_ok=True)
        self.uri = uri

    def _path(self, key: str) -> str:
        return f"{self.root}/{key}"

    def put(self, key: str, data: bytes) -> None:
        """Write an object whole. Local writes go through a temporary name, fsync and a
        rename, so a reader never sees a partial object, even after a power loss (an S3
        PUT is atomic and durable by itself)."""
        path = self._path(key)
        if self.local:
            parent = os.path.dirname(path)
            os.makedirs(parent, exist_ok=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex}"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())  # the data is on disk before any name points at it
            os.replace(tmp, path)
            dir_fd = os.open(parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)  # and so is the rename, before a manifest can follow
            finally:
                os.close(dir_fd)
        else:
            with self.fs.open_output_stream(path) as f:
                f.write(data)

    def get(self, key: str) -> bytes:
        try:
            # open_input_file (random access) is far faster than a streamed readall on S3
            with self.fs.open_input_file(self._path(key)) as f:
                return f.read()
        except FileNotFoundError as e:
            raise NotFound(f"{self.uri}: no object {key}") from e

    def head(self, key: str) -> int:
        info = self.fs.get_file_info(self._path(key))
        if info.type != pafs.FileType.File:
            raise NotFound(f"{self.uri}: no object {key}")
        return info.size

    def exists(self, key: str) -> bool:
        return self.fs.get_file_info(self._path(key)).type == pafs.FileType.File

    def list(self, prefix: str) -> Iterator[str]:
        """Keys of all objects under prefix (a 'directory'), temporary files excluded."""
        selector = pafs.FileSelector(self._path(prefix.rstrip("/")), recursive=True, allow_not_found=True)
        for info in self.fs.get_file_info(selector):
            if info.type == pafs.FileType.File and ".tmp-" not in info.base_name:
                yield info.path[len(self.root) + 1:]

    def delete(self, key: str) -> None:
        try:
            self.fs.delete_file(self._path(key))
        except FileNotFoundError as e:
            raise NotFound(f"{self.uri}: no object {key}") from e


class TreeStore:
    def __init__(self, uri: str, endpoint_url: str | None = None):
        self.objects = ObjectStore(uri, endpoint_url)

    # ---- keys ----------------------------------------------------------------------
    @staticmethod
    def manifest_key(fingerprint: str, key: str) -> str:
        return f"{fingerprint}/manifests/{key[:2]}/{key}.json"

    @staticmethod
    def shard_key(fingerprint: str, key: str, first_chunk: int, digest: str) -> str:
        # The content hash in the name: two writers of one key (a retried task, a twin
        # document, another GPU's rounding) never overwrite a shard a manifest points to.
        return f"{fingerprint}/trees/{key[:2]}/{key}/{first_chunk:08d}-{digest[:16]}.ctt"

    @staticmethod
    def binding_key(fingerprint: str, key: str, doc_id: str) -> str:
        """The record that doc_id was committed to the trees `key`: a manifest's list of
        ids, one object per id so that twins committing at once never overwrite each other."""
        return f"{fingerprint}/bindings/{key[:2]}/{key}/{_id_hash(doc_id)}.json"

    @staticmethod
    def id_key(doc_id: str) -> str:
        h = _id_hash(doc_id)
        return f"ids/{h[:2]}/{h}.json"

    # ---- writing ---------------------------------------------------------------------
    def write_shard(self, key: str, shard: TreeShard) -> ShardRecord:
        data, digest = encode_shard_digest(shard)
        name = self.shard_key(shard.fingerprint, key, shard.tree.first_chunk, digest)
        self.objects.put(name, data)
        return ShardRecord(name=name, chunk_start=shard.tree.first_chunk,
                           chunk_end=shard.tree.first_chunk + shard.tree.n_chunks, bytes=len(data), sha256=digest)

    def commit(self, manifest: Manifest) -> None:
        """Make a document visible: its manifest, then its id pointer (shards must exist)."""
        for s in manifest.shards:
            if self.objects.head(s.name) != s.bytes:
                raise Corrupt(f"shard {s.name} is not the {s.bytes} bytes the manifest records")
        self.objects.put(self.manifest_key(manifest.fingerprint, manifest.key), manifest.to_json())
        self.point(manifest.doc_id, manifest.fingerprint, manifest.key)

    def point(self, doc_id: str, fingerprint: str, key: str) -> bool:
        """Let doc_id name the committed trees `key` (identical texts share one copy): the
        binding of the id to the trees, then the id pointer. Returns False, writing
        nothing, when both exist: a re-run is a no-op."""
        binding = self._record({"doc_id": doc_id, "key": key})
        pointer = self._record({"doc_id": doc_id, "key": key, "fingerprint": fingerprint})
        wrote = False
        for name, data in ((self.binding_key(fingerprint, key, doc_id), binding), (self.id_key(doc_id), pointer)):
            try:
                if self.objects.get(name) == data:
                    continue
            except NotFound:
                pass
            self.objects.put(name, data)
            wrote = True
        return wrote

    @staticmethod
    def _record(doc: dict) -> bytes:
        return json.dumps(doc, sort_keys=True).encode()

    def is_bound(self, fingerprint: str, key: str, doc_id: str) -> bool:
        try:
            return self.objects.get(self.binding_key(fingerprint, key, doc_id)) == \
                self._record({"doc_id": doc_id, "key": key})
        except NotFound:
            return False

    # ---- reading ---------------------------------------------------------------------
    def is_committed(self, fingerprint: str, key: str) -> bool:
        return self.objects.exists(self.manifest_key(fingerprint, key))

    def manifest(self, doc_id: str, fingerprint: str | None = None) -> Manifest:
        """The committed manifest of a document id; FingerprintMismatch if it was built
        under another fingerprint than the one given."""
        with _about(doc_id):
            return self._manifest(doc_id, fingerprint)

    def _manifest(self, doc_id: str, fingerprint: str | None) -> Manifest:
        name = self.id_key(doc_id)
        try:
            pointer = json.loads(self.objects.get(name))
            key, fp, named = pointer["key"], pointer["fingerprint"], pointer["doc_id"]
            if not all(isinstance(v, str) for v in (key, fp, named)):
                raise TypeError("key, fingerprint and doc_id must be strings")
        except NotFound:
            raise UnknownDocument(f"unknown document {doc_id!r}") from None
        except (ValueError, KeyError, TypeError) as e:
            raise Corrupt(f"{name}: malformed id pointer: {e}") from e
        if named != doc_id:
            raise Corrupt(f"{name}: the id pointer is for another document")
        if fingerprint is not None and fp != fingerprint:
            try:  # say which tree settings it has: a store written with another codec is served with that one
                settings = ", ".join(f"{k}={v}" for k, v in sorted(self.manifest_for_key(fp, key).tree_config.items()))
            except StoreError:
                settings = "unreadable"
            raise FingerprintMismatch(f"document {doc_id!r} was compressed under model fingerprint {fp[:16]}... "
                                      f"(tree settings: {settings}), this decoder has {fingerprint[:16]}...: "
                                      "serve it with the model and tree settings it was compressed with "
                                      "(e.g. --codec), or recompress it with this model")
        manifest = self.manifest_for_key(fp, key)
        # The trees must have been committed for this id: by it (the manifest names it) or
        # by a twin with the same text (a binding records it). Stores written before
        # bindings existed: re-run compress over a twin's input to record its binding.
        if manifest.doc_id != doc_id and not self.is_bound(fp, key, doc_id):
            raise Corrupt(f"{name}: the id pointer names trees committed for another document")
        # The manifest belongs to the content key; report it under the id asked for.
        return dataclasses.replace(manifest, doc_id=doc_id)

    def manifest_for_key(self, fingerprint: str, key: str) -> Manifest:
        name = self.manifest_key(fingerprint, key)
        manifest = Manifest.from_json(self.objects.get(name), name)
        if manifest.key != key or manifest.fingerprint != fingerprint:
            raise Corrupt(f"{name}: manifest names key {manifest.key[:16]}... under {manifest.fingerprint[:16]}...")
        return manifest

    def load_tree(self, manifest: Manifest) -> ContextTree:
        """All shards of a committed document, checksums verified against the manifest."""
        with _about(manifest.doc_id):
            return self._load_tree(manifest)

    def _load_tree(self, manifest: Manifest) -> ContextTree:
        # Shards are fetched and verified concurrently: S3 latency overlaps, and the
        # checksum (the CPU cost of a load: sha256 is slower than a page-cache read)
        # runs on several cores (hashlib releases the GIL).
        if len(manifest.shards) == 1:
            parts = [self._load_shard(manifest, manifest.shards[0])]
        else:
            with ThreadPoolExecutor(max_workers=min(LOAD_THREADS, len(manifest.shards))) as pool:
                parts = list(pool.map(lambda s: self._load_shard(manifest, s), manifest.shards))
        tree = concat_trees(parts)
        if tree.n_tokens != manifest.n_tokens:
            raise Corrupt(f"shards hold {tree.n_tokens} tokens, the manifest says {manifest.n_tokens}")
        return tree

    def _load_shard(self, manifest: Manifest, s: ShardRecord) -> ContextTree:
        data = self.objects.get(s.name)
        if len(data) != s.bytes:
            raise Corrupt(f"{s.name}: {len(data)} bytes, its manifest records {s.bytes}: a checksum cannot match")
        try:
            shard = decode_shard(data, s.name, s.sha256)  # one pass: the object's and the manifest's checksum
        except CorruptTreeError as e:
            raise Corrupt(str(e)) from e
        # Every shard is bound to the document the manifest describes: its key,
        # fingerprint, totals, tree settings and chunk range.
        # (The header's doc_id field holds the document key: shards are shared by twins.)
        header = (shard.doc_id, shard.fingerprint, shard.n_tokens, shard.n_chunks_total,
                  shard.tree.config.to_dict(), shard.tree.first_chunk, shard.tree.first_chunk + shard.tree.n_chunks)
        if header != (manifest.key, manifest.fingerprint, manifest.n_tokens, manifest.n_chunks,
                      manifest.tree_config, s.chunk_start, s.chunk_end):
            raise Corrupt(f"{s.name}: header does not match its manifest")
        return shard.tree

    def document_ids(self) -> Iterator[str]:
        for name in self.objects.list("ids"):
            yield json.loads(self.objects.get(name))["doc_id"]
