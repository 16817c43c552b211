"""Tree load bandwidth against the store's raw read bandwidth, side by side in one run,
on a local directory and on S3 (moto's server on loopback).

    python -m bench.treeload [--store ctxtree-data] [--out bench/results/treeload.json]

raw read: every shard of a document fetched as bytes (ObjectStore.get), nothing else;
tree load: TreeStore.load_tree, what a decoder replica's cache does on a miss (fetch,
checksums against the object and its manifest, parse, consistency checks, join the shards).
ratio = load MB/s / raw MB/s. The best of --repeats runs of each (warm page cache).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from ctxtree.runtime import fingerprint_of
from ctxtree.store import TreeStore

REPO = Path(__file__).resolve().parent.parent
DOCS = ["samples/corpus/license-GPL-3.txt", "samples/corpus/debian-reference-ch05-network-setup.txt"]


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def measure(store: TreeStore, doc_id: str, fingerprint: str, repeats: int) -> dict:
    manifest = store.manifest(doc_id, fingerprint)
    total = manifest.total_bytes
    raw_s = best_of(repeats, lambda: [store.objects.get(s.name) for s in manifest.shards])
    load_s = best_of(repeats, lambda: store.load_tree(manifest))
    return {"document": doc_id, "bytes": total, "shards": len(manifest.shards),
            "raw_read_mb_per_s": total / raw_s / 1e6, "tree_load_mb_per_s": total / load_s / 1e6,
            "ratio": raw_s / load_s}


def copy_to_s3(local: TreeStore, uri: str, endpoint: str, doc_ids: list[str], fingerprint: str) -> TreeStore:
    remote = TreeStore(uri, endpoint)
    for doc_id in doc_ids:
        m = local.manifest(doc_id, fingerprint)
        names = [s.name for s in m.shards] + [local.manifest_key(fingerprint, m.key), local.id_key(doc_id),
                                              local.binding_key(fingerprint, m.key, doc_id)]
        for name in names:
            if local.objects.exists(name):
                remote.objects.put(name, local.objects.get(name))
    return remote


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", default=str(REPO / "ctxtree-data"), help="a local store holding the sample corpus")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "treeload.json")
    args = ap.parse_args()
    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
    fingerprint = fingerprint_of()
    local = TreeStore(args.store)
    results = {"local": [measure(local, d, fingerprint, args.repeats) for d in DOCS]}

    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        for k, v in (("AWS_ACCESS_KEY_ID", "bench"), ("AWS_SECRET_ACCESS_KEY", "bench"), ("AWS_REGION", "us-east-1")):
            os.environ.setdefault(k, v)
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="bench")
        remote = copy_to_s3(local, "s3://bench/trees", endpoint, DOCS, fingerprint)
        results["s3_moto"] = [measure(remote, d, fingerprint, args.repeats) for d in DOCS]
    finally:
        server.stop()

    report = {"benchmark": "treeload", "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
              "fingerprint": fingerprint, "repeats": args.repeats, "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    for where, rows in results.items():
        for r in rows:
            print(f"{where:8s} {Path(r['document']).name:40s} {r['bytes'] / 1e6:6.1f} MB: raw {r['raw_read_mb_per_s']:7.0f} "
                  f"MB/s, tree load {r['tree_load_mb_per_s']:6.0f} MB/s, ratio {r['ratio']:.2f}")


if __name__ == "__main__":
    main()
