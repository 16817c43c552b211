"""Pipeline benchmark: the Ray Data compress job vs the same compression in a plain
in-process loop, on the same machine and corpus, in one run.

    python -m bench.pipeline [--corpus samples/corpus] [--out bench/results/pipeline.json]

efficiency = pipeline tokens/s / loop tokens/s (both count only compression work:
the loop after its model is loaded, the job from the start of its Ray Data execution,
which includes starting its workers). Also bytes per document token.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from ctxtree.runtime import load_runtime
from ctxtree.store import TreeStore
from ctxtree.kernels.tree import TreeConfig
from ctxtree.pipelines.compress import JobConfig, run_job
from ctxtree.pipelines.document import CompressSettings, compress_document
from ctxtree.pipelines.ray_compat import PoolSettings
from ctxtree.pipelines.sources import SourceSpec

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, default=REPO / "samples" / "corpus")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "pipeline.json")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--actor-cpus", type=float, default=1.5,
                        help="CPUs of the one compressor actor (the rest tokenizes); threads = ceil")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tree = TreeConfig(dtype=args.dtype)
    files = sorted(p for p in args.corpus.rglob("*") if p.is_file())
    work = Path(tempfile.mkdtemp(prefix="ctxtree-bench-"))
    try:
        rt = load_runtime(tree_config=tree)
        store = TreeStore(str(work / "loop"))
        t0 = time.perf_counter()
        tokens = nbytes = 0
        for f in files:
            r = compress_document(rt, store, str(f), f.read_bytes(), CompressSettings())
            tokens += r.tokens
            nbytes += r.bytes
        loop_s = time.perf_counter() - t0
        loop = {"tokens": tokens, "seconds": loop_s, "tokens_per_s": tokens / loop_s, "bytes": nbytes,
                "torch_threads": torch.get_num_threads()}
        print(f"in-process loop: {tokens:,} tokens in {loop_s:.1f} s = {loop['tokens_per_s']:,.0f} tokens/s", flush=True)

        job = JobConfig(store=str(work / "ray"), sources=SourceSpec((str(args.corpus),)), tree=tree,
                        pool=PoolSettings(num_cpus=args.actor_cpus), progress_seconds=30)
        t0 = time.perf_counter()
        summary = run_job(job)
        job_wall = time.perf_counter() - t0
        result = {
            "corpus": str(args.corpus.relative_to(REPO)) if args.corpus.is_relative_to(REPO) else str(args.corpus),
            "documents": len(files), "tree_config": tree.to_dict(), "cpus": os.cpu_count(),
            "loop": loop,
            "pipeline": {"tokens": summary["tokens"], "seconds": summary["elapsed_s"],
                         "tokens_per_s": summary["tokens_per_s"], "wall_seconds_with_ray_start": job_wall,
                         "actor_cpus": args.actor_cpus, "failed": summary["failed"]},
            "efficiency": summary["tokens_per_s"] / loop["tokens_per_s"],
            "bytes_per_token": summary["bytes_per_token"],
        }
        print(f"Ray Data job: {summary['tokens']:,} tokens in {summary['elapsed_s']:.1f} s = "
              f"{summary['tokens_per_s']:,.0f} tokens/s; efficiency {result['efficiency']:.2f}; "
              f"{result['bytes_per_token']:,.0f} bytes per document token", flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
