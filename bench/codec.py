"""Stored K/V codecs side by side in one run: bytes per document token (and where they go,
per tree level) and the quality bench's held-out lookups answered from trees in each codec.

    python -m bench.codec [--codecs bf16 int8 fp8] [--questions 5] [--lengths 1024 4096 16384 65536]
                          [--out bench/results/codec.json]

Same samples, same adapter, same search for every codec (bench/quality.py's generator,
method `query`); only the stored K/V differ. Trees come from a per-codec chunk cache
(each codec compresses from the model, as `ctxtree compress` does). The bytes are those of
the tree objects `ctxtree compress` writes for samples/GPL-3.txt (default shard size).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import replace
from pathlib import Path

import torch

from bench.quality import heldout_samples
from ctxtree.answer import answer_question
from ctxtree.kernels.codec import CODECS
from ctxtree.kernels.fingerprint import model_fingerprint
from ctxtree.kernels.generate import SamplingConfig
from ctxtree.kernels.tree import ContextTree, TreeConfig, build_tree
from ctxtree.kernels.treefile import encode_shard, shard_tree
from ctxtree.kernels.weights import tokenizer_digest
from ctxtree.pipelines.chunk_pool import ChunkCache
from ctxtree.pipelines.data import KINDS, is_correct, load_haystack
from ctxtree.pipelines.document import CompressSettings
from ctxtree.prompt import document_tokens
from ctxtree.runtime import cache_dir, load_runtime

REPO = Path(__file__).resolve().parent.parent


def bytes_per_level(tree: ContextTree) -> dict[str, float]:
    """Bytes per document token of each tree level's K/V (+ scales), the routing vectors and
    the token ids: where a tree's bytes go."""
    per_position = tree.bytes_per_position()
    counts = tree.node_counts()  # [C,N]; stored node j is heap index j+1, level bit_length(j+2)-1
    out = {}
    for level in range(1, tree.config.height + 1):
        nodes = [j for j in range(tree.config.n_nodes) if (j + 2).bit_length() - 1 == level]
        out[f"level{level}"] = int(counts[:, nodes].sum()) * per_position / tree.n_tokens
    out["routes"] = tree.routes.numel() * tree.routes.element_size() / tree.n_tokens
    out["tokens"] = tree.tokens.numel() * tree.tokens.element_size() / tree.n_tokens
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--codecs", nargs="+", default=["bf16", "int8", "fp8"], choices=sorted(CODECS))
    ap.add_argument("--questions", type=int, default=5, help="per (length, needle kind)")
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    ap.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "codec.json")
    args = ap.parse_args()

    rt = load_runtime()
    tok_digest = tokenizer_digest(rt.tokenizer)
    configs = {c: replace(rt.tree_config, codec=c) for c in args.codecs}
    caches = {c: ChunkCache(cache_dir() / "bench-chunks", model_fingerprint(rt.weights_digest, tok_digest, cfg),
                            rt.model, cfg) for c, cfg in configs.items()}

    # bytes: GPL-3 as `ctxtree compress` stores it
    ids = document_tokens(rt.tokenizer, (REPO / "samples" / "GPL-3.txt").read_text())
    sizes = {}
    for c, cfg in configs.items():
        t0 = time.perf_counter()
        tree = build_tree(rt.model, torch.tensor(ids), cfg)
        build_s = time.perf_counter() - t0
        shards = shard_tree("0" * 64, "GPL-3", tree, tree.n_chunks, len(ids), CompressSettings().max_shard_bytes)
        stored = sum(len(encode_shard(s)) for s in shards)
        sizes[c] = {"bytes_per_token": stored / len(ids), "stored_bytes": stored, "tokens": len(ids),
                    "build_s": build_s, "per_level": bytes_per_level(tree)}
        print(f"[codec] {c}: {stored / len(ids):.0f} bytes per token", flush=True)

    haystack = load_haystack(rt.tokenizer, "heldout")
    sampling = SamplingConfig(max_tokens=args.max_tokens)
    records = []
    for length, kind, i, values, s in heldout_samples(rt, haystack, args.lengths, args.kinds, args.questions,
                                                      args.seed):
        line = []
        for c, cache in caches.items():
            trees = [cache.document(d) for d in s.documents]
            t0 = time.perf_counter()
            answer = answer_question(rt, trees, s.question, sampling)
            ok = is_correct(answer.text, s)
            records.append({"codec": c, "length": length, "kind": kind, "index": i, "values": values,
                            "correct": ok, "seconds": time.perf_counter() - t0,
                            "answer": answer.text[:80], "expected": s.answers})
            line.append(f"{c}={'Y' if ok else 'n'}")
        print(f"[codec] {length} {kind} {i}: {' '.join(line)}", flush=True)

    results = {}
    ref = {(r["length"], r["kind"], r["index"]): r["answer"] for r in records if r["codec"] == args.codecs[0]}
    for c in args.codecs:
        mine = [r for r in records if r["codec"] == c]
        results[c] = {
            "accuracy": sum(r["correct"] for r in mine) / len(mine),
            "right": sum(r["correct"] for r in mine), "questions": len(mine),
            "per_length": {str(n): sum(r["correct"] for r in mine if r["length"] == n) /
                           max(1, sum(1 for r in mine if r["length"] == n)) for n in args.lengths},
            f"same_answer_as_{args.codecs[0]}": sum(r["answer"] == ref[(r["length"], r["kind"], r["index"])]
                                                    for r in mine) / len(mine),
            "seconds_per_question": sum(r["seconds"] for r in mine) / len(mine),
            **sizes[c],
        }
    report = {"benchmark": "codec", "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                                                "platform": platform.platform()},
              "model": rt.ckpt_dir.name, "adapter": rt.adapter_dir.name if rt.adapter_dir else None,
              "tree_config": {k: v for k, v in rt.tree_config.to_dict().items() if k != "codec"},
              "default_codec": TreeConfig().codec, "questions_per_length_and_kind": args.questions,
              "lengths": args.lengths, "kinds": args.kinds, "results": results, "records": records}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(json.dumps({c: {k: v for k, v in r.items() if k in ("accuracy", "bytes_per_token", "seconds_per_question")}
                      for c, r in results.items()}, indent=1))


if __name__ == "__main__":
    main()
