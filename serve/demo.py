"""The end of `make demo`: serve a tree store with `ctxtree serve` on loopback, ask a few
questions over HTTP, print the answers with their timings, and shut the server down.

    python -m serve.demo --store ctxtree-data
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time

import httpx2

QUESTIONS = [
    (["samples/corpus/license-GPL-3.txt"], "What does this license say about warranty?"),
    (["samples/corpus/license-Apache-2.0.txt"], "What does the license grant to contributors?"),
    (["samples/corpus/license-MPL-2.0.txt", "samples/corpus/license-LGPL-3.txt"],
     "Which of these licenses allow linking?"),
    (["samples/corpus/debian-reference-ch05-network-setup.txt"], "How do I configure the network?"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", default="ctxtree-data")
    parser.add_argument("--max-tokens", type=int, default=48)
    args = parser.parse_args()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "ctxtree.cli", "serve", "--store", args.store, "--port", str(port)],
                              env={**os.environ, "RAY_AUTH_MODE": "disabled"}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        print(f"[demo] starting ctxtree serve on {url} ...", flush=True)
        deadline = time.time() + 300
        while True:
            if server.poll() is not None:
                print("[demo] the server exited early", file=sys.stderr)
                return 1
            try:
                if httpx2.get(url + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx2.HTTPError:
                pass
            if time.time() > deadline:
                print("[demo] the server did not become healthy in 300 s", file=sys.stderr)
                return 1
            time.sleep(1)
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
        if server.poll() is None:
            server.send_signal(signal.SIGINT)
            try:
                server.wait(timeout=90)
                print(f"\n[demo] server shut down (exit {server.returncode})", flush=True)
            except subprocess.TimeoutExpired:
                server.kill()


if __name__ == "__main__":
    sys.exit(main())
