"""Serving benchmark against real `ctxtree serve` processes on loopback (Ray Serve,
one replica), all in one run:

- time to first token and requests/s at concurrency 1, 4 and 8 (batching on);
- tree cache miss vs hit (a document's first request vs a repeat);
- batching on vs off (max_batch 8 vs 1) at concurrency 8;
- a bounded load test: N requests (default 300) at concurrency 8, zero 5xx required,
  p50/p99 latency.

    python -m bench.serve --store ctxtree-data [--out bench/results/serve.json]
    python -m bench.serve --engine torch,vllm     (in the vLLM venv, `make test-vllm`: both
                                                   engines, the same figures side by side)

The store must hold the compressed sample corpus (`make demo` writes it).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import statistics
import time
from pathlib import Path

import httpx2

from ctxtree.kernels.engines import ENGINES
from ctxtree.serve.launch import ServeProcess

REPO = Path(__file__).resolve().parent.parent
DOCS = ["samples/corpus/license-GPL-3.txt", "samples/corpus/license-Apache-2.0.txt",
        "samples/corpus/license-MPL-2.0.txt", "samples/corpus/debian-reference-ch05-network-setup.txt"]
QUESTIONS = ["What is this document about?", "Who may copy it?", "What does it say about warranty?",
             "What must a distributor do?"]


def server(store: str, max_batch: int, max_queued: int, adapter: str | None, engine: str) -> ServeProcess:
    return ServeProcess(store, ("--max-batch", str(max_batch), "--max-ongoing", "8", "--max-queued", str(max_queued),
                                "--engine", engine, *(("--adapter", adapter) if adapter else ())))


def ask(url: str, i: int, max_tokens: int) -> dict:
    body = {"documents": [DOCS[i % len(DOCS)]], "question": QUESTIONS[(i // len(DOCS)) % len(QUESTIONS)],
            "max_tokens": max_tokens}
    t0 = time.perf_counter()
    r = httpx2.post(url + "/v1/query", json=body, timeout=600)
    latency = time.perf_counter() - t0
    out = {"status": r.status_code, "latency_s": latency}
    if r.status_code == 200:
        out["ttft_s"] = r.json()["timings"]["ttft_ms"] / 1000
        out["load_ms"] = r.json()["timings"]["load_ms"]
        out["completion_tokens"] = r.json()["usage"]["completion_tokens"]
    return out


def run_load(url: str, n: int, concurrency: int, max_tokens: int, budget_s: float) -> dict:
    deadline = time.time() + budget_s
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        results = [r for r in pool.map(lambda i: ask(url, i, max_tokens) if time.time() < deadline else None,
                                       range(n)) if r is not None]
    wall = time.perf_counter() - t0
    ok = [r for r in results if r["status"] == 200]
    lat = sorted(r["latency_s"] for r in ok)

    def pct(p: float) -> float:
        return lat[min(len(lat) - 1, int(p * len(lat)))] if lat else 0.0

    return {"requests": len(results), "concurrency": concurrency, "ok": len(ok),
            "status_counts": {str(s): sum(r["status"] == s for r in results) for s in {r["status"] for r in results}},
            "server_errors": sum(r["status"] >= 500 and r["status"] != 503 for r in results),
            "overloaded_503": sum(r["status"] == 503 for r in results),
            "requests_per_s": len(ok) / wall if wall > 0 else 0.0,
            "ttft_p50_s": statistics.median(r["ttft_s"] for r in ok) if ok else 0.0,
            # requests/s depends on answer length: the adapter's answers end when it stops
            "completion_tokens_mean": statistics.mean(r["completion_tokens"] for r in ok) if ok else 0.0,
            "latency_p50_s": pct(0.5), "latency_p99_s": pct(0.99), "wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", default=str(REPO / "ctxtree-data"))
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "serve.json")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--sweep-requests", type=int, default=16)
    parser.add_argument("--load-requests", type=int, default=300)
    parser.add_argument("--budget-s", type=float, default=900, help="time bound of each load loop")
    parser.add_argument("--adapter", default=None,
                        help="the server's --adapter (default: the shipped one; 'none': the base model, whose "
                             "answers run to --max-tokens)")
    parser.add_argument("--engine", default="torch",
                        help="torch, vllm, or torch,vllm: each runs the whole suite, in that order")
    args = parser.parse_args()
    engines = args.engine.split(",")
    if not engines or any(e not in ENGINES for e in engines) or len(set(engines)) != len(engines):
        parser.error(f"--engine: torch, vllm or torch,vllm, not {args.engine!r}")
    runs = {engine: suite(args, engine) for engine in engines}
    if len(runs) == 1:
        result = runs[engines[0]]
    else:
        t, v = runs["torch"], runs["vllm"]
        ratio = {f"concurrency_{c['concurrency']}_requests_per_s": (vc["requests_per_s"] / c["requests_per_s"]
                                                                    if c["requests_per_s"] else 0.0)
                 for c, vc in zip(t["concurrency"], v["concurrency"])}
        ratio["hit_ttft"] = v["cache"]["hit_ttft_s"] / t["cache"]["hit_ttft_s"] if t["cache"]["hit_ttft_s"] else 0.0
        result = {"engines": runs, "vllm_over_torch": ratio}
        print("vllm / torch: " + ", ".join(f"{k} {x:.2f}x" for k, x in ratio.items()), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


def suite(args, engine: str) -> dict:
    print(f"-- engine {engine}", flush=True)
    result: dict = {"engine": engine, "max_tokens": args.max_tokens, "cpus": os.cpu_count(),
                    "adapter": args.adapter or "shipped"}
    srv = server(args.store, max_batch=8, max_queued=64, adapter=args.adapter, engine=engine)
    try:
        miss = [ask(srv.url, i, args.max_tokens) for i in range(len(DOCS))]     # first touch: loads
        hit = [ask(srv.url, i, args.max_tokens) for i in range(len(DOCS))]      # now resident
        result["cache"] = {"miss_ttft_s": statistics.median(r["ttft_s"] for r in miss),
                           "miss_load_ms": statistics.median(r["load_ms"] for r in miss),
                           "hit_ttft_s": statistics.median(r["ttft_s"] for r in hit),
                           "hit_load_ms": statistics.median(r["load_ms"] for r in hit)}
        print(f"cache: miss TTFT {result['cache']['miss_ttft_s'] * 1000:.0f} ms (load "
              f"{result['cache']['miss_load_ms']:.0f} ms) vs hit {result['cache']['hit_ttft_s'] * 1000:.0f} ms",
              flush=True)
        result["concurrency"] = []
        for c in (1, 4, 8):
            r = run_load(srv.url, args.sweep_requests, c, args.max_tokens, args.budget_s)
            result["concurrency"].append(r)
            print(f"concurrency {c}: {r['requests_per_s']:.2f} req/s, TTFT p50 {r['ttft_p50_s'] * 1000:.0f} ms, "
                  f"latency p50 {r['latency_p50_s']:.2f} s", flush=True)
        load = run_load(srv.url, args.load_requests, 8, args.max_tokens, args.budget_s)
        result["load_test"] = load
        print(f"load test: {load['requests']} requests at concurrency 8: {load['server_errors']} 5xx, "
              f"{load['overloaded_503']} 503, p50 {load['latency_p50_s']:.2f} s, p99 {load['latency_p99_s']:.2f} s, "
              f"{load['requests_per_s']:.2f} req/s", flush=True)
    finally:
        srv.stop()

    srv = server(args.store, max_batch=1, max_queued=64, adapter=args.adapter, engine=engine)
    try:
        off = run_load(srv.url, args.sweep_requests, 8, args.max_tokens, args.budget_s)
    finally:
        srv.stop()
    on = result["concurrency"][-1]
    result["batching"] = {"on_requests_per_s": on["requests_per_s"], "off_requests_per_s": off["requests_per_s"],
                          "speedup": on["requests_per_s"] / off["requests_per_s"] if off["requests_per_s"] else 0.0,
                          "off": off}
    print(f"batching at concurrency 8: on {on['requests_per_s']:.2f} req/s vs off {off['requests_per_s']:.2f} req/s "
          f"({result['batching']['speedup']:.2f}x)", flush=True)
    return result


if __name__ == "__main__":
    main()
