"""The end of `make demo`: serve a tree store with `ctxtree serve` on loopback, ask a few
questions over HTTP, print the answers with their timings, and shut the server down.

    python -m ctxtree.serve.demo --store ctxtree-data
"""

from __future__ import annotations

import argparse
import sys

import httpx2

from ctxtree.serve.launch import ServeProcess

QUESTIONS = [
    (["samples/corpus/license-GPL-3.txt"], "What does this license say about warranty?"),
    (["samples/corpus/license-Apache-2.0.txt"], "What does the license grant to contributors?"),
    (["samples/corpus/license-MPL-2.0.txt", "samples/corpus/license-LGPL-3.txt"],
     "Which of these licenses allow linking?"),
    (["samples/corpus/debian-reference-ch05-network-setup.txt"], "How do I configure the network?"),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", default="ctxtree-data")
    parser.add_argument("--max-tokens", type=int, default=48)
    args = parser.parse_args()
    print("[demo] starting ctxtree serve on loopback ...", flush=True)
    try:
        server = ServeProcess(args.store)
    except RuntimeError as e:
        print(f"[demo] {e}", file=sys.stderr)
        return 1
    url = server.url
    try:
        print(f"[demo] serving on {url}", flush=True)
        for documents, question in QUESTIONS:
            r = httpx2.post(url + "/v1/query", json={"documents": documents, "question": question,
                                                     "max_tokens": args.max_tokens}, timeout=300)
            if r.status_code != 200:
                print(f"[demo] {r.status_code}: {r.text}", file=sys.stderr)
                return 1
            data, t = r.json(), r.json()["timings"]
            print(f"\nQ: {question}\n   documents: {', '.join(documents)}\nA: {data['answer']}\n"
                  f"   load {t['load_ms']:.0f} ms, time to first token {t['ttft_ms']:.0f} ms, "
                  f"total {t['total_ms']:.0f} ms, {t['tokens_per_s']:.1f} tokens/s", flush=True)
        return 0
    finally:
        print(f"\n[demo] server shut down (exit {server.stop()})", flush=True)


if __name__ == "__main__":
    sys.exit(main())
