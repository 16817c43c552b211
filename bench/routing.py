"""Search quality on held-out questions: where does the asked value end up?

    python -m bench.routing [--questions 20] [--lengths 1024 4096 16384] [--out bench/results/routing.json]

For each held-out sample (ctxtree/pipelines/data.py, the same stream as bench/quality.py) and
each search policy, the tree level of the injected node holding each asked value:
level h (the finest: every position kept at the default L = 256, p = 32; every 4th at
L = 1024) is where a value can be read back; levels 1..h-1 keep fewer; 0 would mean not
injected (never happens: every chunk injects a cover of itself). Policies:

- `query`:  token match (ctxtree/kernels/tree.py token_match_scores, this project's search);
- `vector`: the method's routing vector, cos(final_norm(h0[last])) (method.md §4);
- `right`:  always the right child (the paper's language-modelling rule).

This needs no trained weights and no decoding: it isolates search from copying. Trees
come from the same chunk cache as bench/quality.py.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections import defaultdict
from pathlib import Path

import torch

from bench.quality import injected_level
from ctxtree.cli_args import add_model_args, tree_config
from ctxtree.prompt import question_prompt, question_tokens
from ctxtree.runtime import NO_ADAPTER, cache_dir, load_runtime
from ctxtree.kernels.compressor import query_vector, route_query
from ctxtree.kernels.generate import left_pad
from ctxtree.kernels.tree import POLICIES, search
from ctxtree.pipelines.chunk_pool import ChunkCache
from ctxtree.pipelines.data import KINDS, load_haystack, make_sample

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--questions", type=int, default=20, help="per (length, needle kind)")
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    ap.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    add_model_args(ap, adapter=False)  # --model and the tree settings, as `ctxtree ask` takes them
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "routing.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    rt = load_runtime(Path(args.model) if args.model else None, tree_config(args), adapter=NO_ADAPTER,
                      device=args.device)
    height = rt.tree_config.height
    haystack = load_haystack(rt.tokenizer, "heldout")
    chunks = ChunkCache(cache_dir() / "bench-chunks", rt.fingerprint, rt.model, rt.tree_config)
    # (policy, length, kind) -> count of asked values per injected level
    levels: dict[tuple[str, int, str], list[int]] = defaultdict(lambda: [0] * (height + 1))
    search_s: dict[str, float] = defaultdict(float)
    n_searches = 0
    t_start = time.perf_counter()
    for length in args.lengths:
        for kind in args.kinds:
            for i in range(args.questions):
                s = make_sample(rt.tokenizer, haystack, i, length, kind, seed=args.seed,
                                align=rt.tree_config.chunk_len)
                trees = [chunks.document(d) for d in s.documents]
                prompt, query_index = question_prompt(rt.tokenizer, s.question)
                batch = left_pad([prompt], device=rt.model.device)
                q = query_vector(rt.model, batch.input_ids, batch.positions, batch.token_valid,
                                 torch.tensor([query_index]))[0]
                route = route_query(rt.model, q, question_tokens(rt.tokenizer, s.question))
                n_searches += 1
                for policy in POLICIES:
                    t0 = time.perf_counter()
                    selections = [search(tree, route, policy) for tree in trees]
                    search_s[policy] += time.perf_counter() - t0
                    for d, pos in s.answer_positions:
                        levels[(policy, length, kind)][injected_level(trees[d], selections[d], pos)] += 1
            row = {p: levels[(p, length, kind)] for p in POLICIES}
            print(f"[routing] {length} {kind}: " + " ".join(
                f"{p} finest {r[height]}/{sum(r)}" for p, r in row.items()), flush=True)

    results = []
    for (policy, length, kind), counts in sorted(levels.items()):
        total = sum(counts)
        results.append({"policy": policy, "length": length, "kind": kind, "values": total,
                        "finest": counts[height] / total,
                        "by_level": {str(lv): counts[lv] for lv in range(height + 1)}})
    summary = {}
    for policy in POLICIES:
        for length in args.lengths:
            rows = [r for r in results if r["policy"] == policy and r["length"] == length]
            total = sum(r["values"] for r in rows)
            summary.setdefault(policy, {})[str(length)] = sum(r["finest"] * r["values"] for r in rows) / total
    report = {
        "what": "fraction of asked values whose finest-level node the search injects, held-out questions",
        "machine": {"cpus": torch.get_num_threads(), "platform": platform.platform()},
        "config": {"questions_per_kind": args.questions, "lengths": args.lengths, "kinds": args.kinds,
                   "tree": rt.tree_config.to_dict(), "seed": args.seed},
        "finest_by_policy_and_length": summary,
        "seconds_per_search": {p: search_s[p] / max(1, n_searches) for p in POLICIES},
        "results": results,
        "wall_s": time.perf_counter() - t_start,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({"finest": summary, "seconds_per_search": report["seconds_per_search"]}, indent=1))
    print(f"[routing] wrote {args.out}")


if __name__ == "__main__":
    main()
