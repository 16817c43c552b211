"""The main job: compress a corpus into context trees in a tree store, on Ray Data.

    python -m ctxtree.pipelines.compress --store URI INPUT [INPUT ...]   (also `ctxtree compress`)

read (Ray Data) -> prepare (tasks: decode, validate, skip committed, tokenize) ->
compress (actor pool: trees chunk-batch by chunk-batch, shards, commit) -> driver
(progress, failures table, summary). Nothing lost: every input document ends as
committed, skipped (already committed) or a failure record with its reason. Nothing
twice: a re-run skips committed documents, and a crashed run's leftovers are invisible
(no manifest) and overwritten by the re-run.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa
import torch

from ctxtree.cli_args import add_model_args, tree_config
from ctxtree.runtime import Runtime, cache_dir, default_model_path, fingerprint_of, load_runtime
from ctxtree.store import TreeStore, document_key
from ctxtree.kernels.tree import TreeConfig
from ctxtree.kernels.weights import load_tokenizer, prepare_checkpoint
from ctxtree.pipelines.document import BadDocument, CompressSettings, compress_tokens, decode_text, tokenize
from ctxtree.pipelines.ray_compat import PREPARE_CPUS, PoolSettings, init_ray, map_with_actor_pool, map_with_tasks
from ctxtree.pipelines.sources import SourceSpec, expand_inputs, read_documents

RESULT_SCHEMA = pa.schema([("id", pa.string()), ("key", pa.string()), ("status", pa.string()),
                           ("error", pa.string()), ("tokens", pa.int64()), ("chunks", pa.int64()),
                           ("bytes", pa.int64()), ("seconds", pa.float64())])


@dataclass(frozen=True)
class JobConfig:
    store: str
    sources: SourceSpec
    model: str | None = None                 # None: the default model
    tree: TreeConfig = field(default_factory=TreeConfig)
    device: str | None = None                # None: the actor's GPU if Ray gave it one (--num-gpus), else cpu
    settings: CompressSettings = field(default_factory=CompressSettings)
    pool: PoolSettings = field(default_factory=PoolSettings)
    max_failed_fraction: float = 0.1
    progress_seconds: float = 10.0

    def __post_init__(self) -> None:
        if not 0 <= self.max_failed_fraction <= 1:
            raise ValueError(f"max_failed_fraction must be in [0, 1], got {self.max_failed_fraction}")


# ---- worker side ----------------------------------------------------------------------

@functools.lru_cache(maxsize=2)
def _runtime(model: str | None, tree: TreeConfig, device: str | None = None) -> Runtime:
    """One model per worker process (tasks reuse their process across batches)."""
    return load_runtime(Path(model) if model else None, tree, device=device)


@functools.lru_cache(maxsize=2)
def _tokenizer(model: str | None):
    """Tokenizing tasks need only the tokenizer, not the weights."""
    return load_tokenizer(prepare_checkpoint(Path(model) if model else default_model_path(), cache_dir()))


@functools.lru_cache(maxsize=4)
def _store(uri: str) -> TreeStore:
    return TreeStore(uri)


def prepare_batch(batch: pa.Table, job: JobConfig, fingerprint: str) -> pa.Table:
    """{id, data, error} -> {id, key, status, error, token_ids}: status todo/skipped/failed.
    (The fingerprint was computed by the driver; the actors check their model against it.)"""
    tokenizer = _tokenizer(job.model)
    store = _store(job.store)
    rows = {"id": [], "key": [], "status": [], "error": [], "token_ids": []}
    for doc_id, data, error in zip(batch.column("id").to_pylist(), batch.column("data").to_pylist(),
                                   batch.column("error").to_pylist()):
        key, status, ids = "", "failed", []
        try:
            if error:
                raise BadDocument(error)
            text = decode_text(data, job.settings)
            key = document_key(text, fingerprint)
            if store.is_committed(fingerprint, key):
                status = "skipped"
            else:
                ids, status = tokenize(tokenizer, text, job.settings), "todo"
        except BadDocument as e:
            error = str(e)
        except Exception as e:  # a tokenizer or storage error: recorded for this document, not fatal
            key, status, ids, error = "", "failed", [], f"{type(e).__name__}: {e}"
        for name, value in (("id", doc_id), ("key", key), ("status", status), ("error", error), ("token_ids", ids)):
            rows[name].append(value)
    return pa.table({**{k: pa.array(v, pa.string()) for k, v in rows.items() if k != "token_ids"},
                     "token_ids": pa.array(rows["token_ids"], pa.list_(pa.int32()))})


class CompressActor:
    """Holds the model; compresses the documents `prepare_batch` marked todo."""

    def __init__(self, job: JobConfig, fingerprint: str):
        # Ray pins OMP threads to int(num_cpus) (1 by default); torch follows the actor's share.
        torch.set_num_threads(max(1, math.ceil(job.pool.num_cpus)))
        self.job = job
        self.rt = _runtime(job.model, job.tree, job.device)
        if self.rt.fingerprint != fingerprint:
            raise RuntimeError(f"actor model fingerprint {self.rt.fingerprint[:16]} != driver's {fingerprint[:16]}")
        self.store = _store(job.store)

    def __call__(self, batch: pa.Table) -> pa.Table:
        out = []
        for row in batch.to_pylist():
            result = {"id": row["id"], "key": row["key"], "status": row["status"], "error": row["error"],
                      "tokens": 0, "chunks": 0, "bytes": 0, "seconds": 0.0}
            if row["status"] in ("todo", "skipped"):
                try:
                    r = compress_tokens(self.rt, self.store, row["id"], row["key"], row["token_ids"] or [],
                                        self.job.settings)
                    result.update(status=r.status, tokens=r.tokens, chunks=r.chunks, bytes=r.bytes,
                                  seconds=r.seconds)
                except Exception as e:  # one bad document must not fail the job: record it
                    result.update(status="failed", error=f"{type(e).__name__}: {e}")
            out.append(result)
        return pa.Table.from_pylist(out, schema=RESULT_SCHEMA)


# ---- driver side ------------------------------------------------------------------------

@dataclass
class Tally:
    files: int
    started: float = field(default_factory=time.perf_counter)
    done: int = 0
    committed: int = 0
    skipped: int = 0
    failed: int = 0
    tokens: int = 0
    chunks: int = 0
    bytes: int = 0
    failures: list = field(default_factory=list)

    def add(self, row: dict) -> None:
        self.done += 1
        if row["status"] == "committed":
            self.committed += 1
            self.tokens += row["tokens"]
            self.chunks += row["chunks"]
            self.bytes += row["bytes"]
        elif row["status"] == "skipped":
            self.skipped += 1
        else:
            self.failed += 1
            self.failures.append({"id": row["id"], "error": row["error"] or row["status"]})

    def line(self) -> str:
        dt = time.perf_counter() - self.started
        return (f"[compress] {self.done} documents done from {self.files} input files ({self.committed} committed, "
                f"{self.skipped} skipped, {self.failed} failed), {self.tokens:,} tokens, "
                f"{self.tokens / max(dt, 1e-9):,.0f} tokens/s, {dt:.0f} s")


def run_job(job: JobConfig, address: str | None = None) -> dict:
    """Run the job; returns the summary (also written to the store and printed)."""
    files = expand_inputs(job.sources)
    store = TreeStore(job.store)
    # converts the model once, before the workers; builds no model or decoder
    fingerprint = fingerprint_of(Path(job.model) if job.model else None, job.tree)
    init_ray(address)
    ds = read_documents(files, job.sources)
    # Documents are counted as they come back (a jsonl or parquet file holds many):
    # counting up front would read the whole corpus twice.
    ds = map_with_tasks(ds, prepare_batch, (job, fingerprint), batch_size=8, num_cpus=PREPARE_CPUS)
    ds = map_with_actor_pool(ds, CompressActor, (job, fingerprint), job.pool, batch_size=1)
    tally = Tally(files=files.count)
    last = time.perf_counter()
    print(f"[compress] {files.count} input files -> {job.store} (fingerprint {fingerprint[:16]})", flush=True)
    for row in ds.iter_rows():
        tally.add(row)
        if time.perf_counter() - last >= job.progress_seconds:
            print(tally.line(), flush=True)
            last = time.perf_counter()
    elapsed = time.perf_counter() - tally.started
    run_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:8]
    summary = {
        "run_id": run_id, "store": job.store, "fingerprint": fingerprint, "inputs": list(job.sources.inputs),
        "documents": tally.done, "committed": tally.committed, "skipped": tally.skipped, "failed": tally.failed,
        "tokens": tally.tokens, "chunks": tally.chunks, "bytes": tally.bytes,
        "bytes_per_token": tally.bytes / tally.tokens if tally.tokens else 0.0,
        "tokens_per_s": tally.tokens / elapsed if elapsed > 0 else 0.0, "elapsed_s": elapsed,
        "failed_fraction": tally.failed / tally.done if tally.done else 0.0,
        "max_failed_fraction": job.max_failed_fraction, "tree_config": job.tree.to_dict(),
    }
    runs = f"{fingerprint}/runs/{run_id}"
    store.objects.put(f"{runs}/failures.jsonl",
                      "".join(json.dumps(f, sort_keys=True) + "\n" for f in tally.failures).encode())
    store.objects.put(f"{runs}/summary.json", json.dumps(summary, indent=2, sort_keys=True).encode())
    print(tally.line(), flush=True)
    for f in tally.failures[:20]:
        print(f"[compress] failed: {f['id']}: {f['error']}", flush=True)
    print(json.dumps(summary, indent=2, sort_keys=True), flush=True)
    return summary


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", help="files or directories (local or s3://): .jsonl, .parquet, text files")
    p.add_argument("--store", default="ctxtree-data", help="tree store: a local directory or s3://bucket/prefix")
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")
    p.add_argument("--id-column", default="id")
    p.add_argument("--text-column", default="text")
    add_model_args(p, adapter=False)
    p.add_argument("--actors", type=int, default=1, help="compressor actors (max; one per GPU on a cluster)")
    p.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per compressor actor (1 on GPU clusters)")
    p.add_argument("--actor-cpus", type=float, default=1.0,
                   help="CPUs per compressor actor (also its torch threads, rounded up)")
    p.add_argument("--chunks-per-batch", type=int, default=16)
    p.add_argument("--max-shard-mb", type=float, default=32.0)
    p.add_argument("--max-doc-mb", type=float, default=64.0)
    p.add_argument("--max-doc-tokens", type=int, default=4_000_000)
    p.add_argument("--max-failed-fraction", type=float, default=0.1)
    p.add_argument("--progress-seconds", type=float, default=10.0)
    return p


def job_from_args(args: argparse.Namespace) -> JobConfig:
    store = args.store
    if "://" not in store:
        store = os.path.abspath(store)  # workers do not share the driver's working directory
    return JobConfig(
        store=store,
        sources=SourceSpec(tuple(args.inputs), args.id_column, args.text_column),
        model=args.model,
        tree=tree_config(args),
        device=args.device,
        settings=CompressSettings(chunks_per_batch=args.chunks_per_batch,
                                  max_shard_bytes=int(args.max_shard_mb * 2 ** 20),
                                  max_doc_bytes=int(args.max_doc_mb * 2 ** 20), max_doc_tokens=args.max_doc_tokens),
        pool=PoolSettings(min_actors=1, max_actors=args.actors, num_gpus=args.num_gpus, num_cpus=args.actor_cpus),
        max_failed_fraction=args.max_failed_fraction,
        progress_seconds=args.progress_seconds,
    )


def main(argv: list[str] | None = None, prog: str = "python -m ctxtree.pipelines.compress") -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser(prog).parse_args(argv)
    try:
        job = job_from_args(args)
        summary = run_job(job, args.address)
    except (ValueError, FileNotFoundError) as e:
        print(f"compress: error: {e}", file=sys.stderr)
        return 2
    if summary["failed_fraction"] > job.max_failed_fraction:
        print(f"compress: {summary['failed']} of {summary['documents']} documents failed "
              f"({100 * summary['failed_fraction']:.1f}% > {100 * job.max_failed_fraction:.1f}%)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    # Run the importable module's main, not __main__'s: Ray pickles stage functions and
    # classes by module name, and workers cannot import `__main__`.
    from ctxtree.pipelines.compress import main as _main

    sys.exit(_main())
