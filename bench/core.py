"""Core benchmark: compressor throughput, and time to first token with pre-built trees
vs the base model reading the whole document, measured side by side in one run.

    python -m bench.core [--out bench/results/core.json] [--lengths 2000 8000] [--repeats 2]

(a) compressor tokens/s per compute dtype, and its achieved FLOP/s as a fraction of
    this machine's measured dense matmul FLOP/s in the same dtype;
(b) time to first token for one question over documents of each length: injection
    decoder (trees built beforehand, as the endpoint has them) vs the base model with
    the whole document in its prompt; the ratio is base / injection.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from ctxtree.answer import answer_question
from ctxtree.prompt import document_tokens, question_prompt
from ctxtree.runtime import load_runtime
from ctxtree.kernels.generate import SamplingConfig, generate
from ctxtree.kernels.inject import InjectionDecoder
from ctxtree.kernels.tree import COMPUTE_DTYPES, TreeConfig, build_tree, keep_per_node, node_spans

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "samples" / "GPL-3.txt"
QUESTION = "What must you do when you convey the object code of a covered work?"


def matmul_flops(dtype: torch.dtype, n: int = 1536, seconds: float = 3.0) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm up
    count, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        count += 1
    return 2 * n ** 3 * count / (time.perf_counter() - t0)


def compress_flops(cfg_model, tree_cfg: TreeConfig, n_tokens: int) -> float:
    """Multiply-adds x2 the compressor performs on n_tokens (matmuls and attention)."""
    d, hd, h, hkv, f = (cfg_model.hidden_size, cfg_model.head_dim, cfg_model.num_attention_heads,
                        cfg_model.num_key_value_heads, cfg_model.intermediate_size)
    full_layer = 2 * (d * h * hd * 2 + d * hkv * hd * 2 + 3 * d * f)  # q,o + k,v + MLP, per token
    kv_only = 2 * d * hkv * hd * 2
    m = tree_cfg.n_layers
    per_token = (m - 1) * full_layer + kv_only if m > 1 else full_layer
    total = 0.0
    for start in range(0, n_tokens, tree_cfg.chunk_len):
        length = min(tree_cfg.chunk_len, n_tokens - start)
        for s, e in node_spans(length, tree_cfg.height)[1:]:
            t = e - s
            total += t * per_token + max(m - 1, 1) * 2 * t * t * h * hd  # causal attention ~ T^2 * H * Dh * 2
    return total


def bench_compressor(dtype_name: str, doc_ids: list[int]) -> dict:
    cfg = TreeConfig(dtype=dtype_name)
    rt = load_runtime(tree_config=cfg)
    ids = torch.tensor(doc_ids)
    build_tree(rt.model, ids[:1024], cfg)  # warm up
    t0 = time.perf_counter()
    tree = build_tree(rt.model, ids, cfg)
    dt = time.perf_counter() - t0
    peak = matmul_flops(COMPUTE_DTYPES[dtype_name])
    flops = compress_flops(rt.model.cfg, cfg, len(doc_ids))
    return {"dtype": dtype_name, "tokens": len(doc_ids), "seconds": dt, "tokens_per_s": len(doc_ids) / dt,
            "achieved_gflops": flops / dt / 1e9, "matmul_gflops": peak / 1e9,
            "fraction_of_matmul_peak": flops / dt / peak, "tree_bytes_per_token": tree.nbytes() / len(doc_ids)}


def ttft_base_full_prompt(rt, doc_ids: list[int], question: str) -> float:
    """Base model, document then question in the prompt: seconds to the first token."""
    prompt, _ = question_prompt(rt.tokenizer, question)
    plain = InjectionDecoder(rt.model, 1)  # zero-initialised and no context: exactly the base model
    t0 = time.perf_counter()
    next(iter(generate(plain, [doc_ids + prompt], None, SamplingConfig(max_tokens=1))))
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "core.json")
    parser.add_argument("--lengths", type=int, nargs="+", default=[2000, 8000])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--compress-tokens", type=int, default=8192)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    rt = load_runtime()
    text = SAMPLE.read_text()
    base_ids = document_tokens(rt.tokenizer, text)
    longest = max(args.lengths + [args.compress_tokens])
    doc_ids = (base_ids * (longest // len(base_ids) + 1))[:longest]

    result: dict = {"machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                                "platform": platform.platform(), "torch": torch.__version__},
                    "model": rt.ckpt_dir.name, "tree_config": rt.tree_config.to_dict(), "compressor": [], "ttft": []}
    for dtype_name in ("float32", "bfloat16"):
        r = bench_compressor(dtype_name, doc_ids[: args.compress_tokens])
        result["compressor"].append(r)
        print(f"compressor {dtype_name}: {r['tokens_per_s']:,.0f} tokens/s, {r['achieved_gflops']:.0f} GFLOP/s "
              f"= {100 * r['fraction_of_matmul_peak']:.0f}% of matmul {r['matmul_gflops']:.0f} GFLOP/s", flush=True)

    for n in args.lengths:
        ids = doc_ids[:n]
        tree = build_tree(rt.model, torch.tensor(ids), rt.tree_config)
        inj, base = [], []
        for _ in range(args.repeats):
            ans = answer_question(rt, [tree], QUESTION, SamplingConfig(max_tokens=1))
            inj.append(ans.timings["ttft_ms"] / 1000)
            base.append(ttft_base_full_prompt(rt, ids, QUESTION))
        row = {"doc_tokens": n, "chunks": tree.n_chunks,
               "injected_positions": sum((rt.tree_config.height + 1) * min(keep_per_node(c, rt.tree_config), c)
                                         for c in tree.chunk_lengths),
               "inject_ttft_s": statistics.median(inj), "base_full_prompt_ttft_s": statistics.median(base)}
        row["speedup_base_over_inject"] = row["base_full_prompt_ttft_s"] / row["inject_ttft_s"]
        result["ttft"].append(row)
        print(f"TTFT over {n} tokens: injection {1000 * row['inject_ttft_s']:.0f} ms vs base with the document in "
              f"its prompt {1000 * row['base_full_prompt_ttft_s']:.0f} ms: {row['speedup_base_over_inject']:.1f}x",
              flush=True)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
