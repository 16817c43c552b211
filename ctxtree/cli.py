"""The `ctxtree` command line."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from ctxtree.kernels.generate import SamplingConfig
from ctxtree.cli_args import add_model_args, tree_config
from ctxtree.kernels.tree import POLICIES, build_tree, injected_chunks, node_spans


def cmd_ask(args: argparse.Namespace) -> int:
    from ctxtree.answer import answer_question
    from ctxtree.prompt import document_tokens
    from ctxtree.runtime import load_runtime

    texts = []
    for doc in args.doc:
        try:
            texts.append(doc.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as e:
            print(f"ctxtree ask: cannot read {doc}: {e}", file=sys.stderr)
            return 2
    sampling = SamplingConfig(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p)
    t = time.perf_counter()
    rt = load_runtime(Path(args.model) if args.model else None, tree_config(args),
                      Path(args.adapter) if args.adapter else None, args.cross_rope, args.top_chunks, args.device,
                      args.reading_from)
    print(f"model {rt.ckpt_dir.name} loaded in {time.perf_counter() - t:.1f} s; fingerprint {rt.fingerprint[:16]}",
          file=sys.stderr)
    trees = []
    for doc, text in zip(args.doc, texts):
        import torch

        ids = document_tokens(rt.tokenizer, text)
        t = time.perf_counter()
        tree = build_tree(rt.model, torch.tensor(ids), rt.tree_config)
        dt = time.perf_counter() - t
        print(f"tree build: {doc.name}: {len(ids)} tokens, {tree.n_chunks} chunks, {tree.nbytes() / 2**20:.1f} MiB "
              f"in {dt:.2f} s ({len(ids) / dt:,.0f} tokens/s)", file=sys.stderr)
        trees.append(tree)
    print(f"Q: {args.question}\nA: ", end="", flush=True)
    ans = answer_question(rt, trees, args.question, sampling, args.policy, args.seed,
                          on_text=lambda s: print(s, end="", flush=True))
    print()
    tm = ans.timings
    print(f"timings: search {tm['search_ms']:.0f} ms, time to first token {tm['ttft_ms']:.0f} ms, "
          f"{tm['tokens']} tokens at {tm['decode_tokens_per_s']:.1f} tokens/s, total {tm['total_ms']:.0f} ms")
    print(f"search (policy {args.policy}): nodes chosen per chunk, as token ranges in the document")
    for doc, tree, sel in zip(args.doc, trees, ans.selections):
        injected = injected_chunks(sel).tolist()
        for c in injected[:args.show_chunks]:
            base = sum(tree.chunk_lengths[:c])
            spans = node_spans(tree.chunk_lengths[c], tree.config.height)
            parts = [f"{base + spans[i][0]}-{base + spans[i][1]}" for i in sel[c].tolist()]
            print(f"  {doc.name} chunk {c}: nodes {sel[c].tolist()} = tokens {', '.join(parts)}")
        if len(injected) > args.show_chunks:
            print(f"  {doc.name}: ... {len(injected) - args.show_chunks} more chunks")
        if len(injected) < tree.n_chunks:
            print(f"  {doc.name}: {tree.n_chunks - len(injected)} of {tree.n_chunks} chunks not injected "
                  f"(top chunks: {rt.decoder.top_chunks})")
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["compress"]:
        # The Ray job has its own parser; importing it (and Ray) only when asked keeps `ask` fast.
        from ctxtree.pipelines.compress import main as compress_main

        return compress_main(argv[1:], prog="ctxtree compress")
    if argv[:1] == ["train"]:
        from ctxtree.pipelines.train import main as train_main

        return train_main(argv[1:], prog="ctxtree train")
    if argv[:1] == ["serve"]:
        from ctxtree.serve.run import main as serve_main

        return serve_main(argv[1:], prog="ctxtree serve")
    parser = argparse.ArgumentParser(prog="ctxtree", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("compress", add_help=False,
                   help="compress a corpus into a tree store on Ray Data (see `ctxtree compress --help`)")
    sub.add_parser("train", add_help=False,
                   help="train the injection weights on Ray Train (see `ctxtree train --help`)")
    sub.add_parser("serve", add_help=False,
                   help="serve a tree store over HTTP on Ray Serve (see `ctxtree serve --help`)")
    ask = sub.add_parser("ask", help="answer a question about local text files (single process, trees in memory)")
    ask.add_argument("--doc", type=Path, action="append", required=True, help="a UTF-8 text file (repeatable)")
    ask.add_argument("--question", required=True)
    ask.add_argument("--policy", default="query", choices=POLICIES, help="tree search policy")
    ask.add_argument("--cross-rope", default=None, choices=["chunk", "none"], help="chunk-level RoPE in cross-attention")
    ask.add_argument("--max-tokens", type=int, default=128)
    ask.add_argument("--temperature", type=float, default=0.0)
    ask.add_argument("--top-p", type=float, default=1.0)
    ask.add_argument("--seed", type=int, default=0)
    ask.add_argument("--show-chunks", type=int, default=8, help="chunks to list in the search report")
    add_model_args(ask)
    ask.set_defaults(func=cmd_ask)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"ctxtree {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
