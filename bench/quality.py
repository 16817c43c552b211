"""Answer quality against document length, on held-out questions (ctxtree/pipelines/data.py).

    python -m bench.quality [--questions 13] [--lengths 1024 ... 65536] [--out bench/results/quality.json]
                            [--plot docs/quality.png] [--adapter DIR] [--methods query right ...]

Methods, all on the same held-out samples (haystack text, entities, templates and
question phrasings never seen in training):
- `query`:  the injection decoder with the shipped (or --adapter) weights, search policy query;
- `vector`: the same, search policy vector (the method's routing vector, method.md §4);
- `right`:  the same, search policy right (the paper's language-modelling rule);
- `norope`: the same, cross_rope none (no chunk-level positions);
- `zero`:   the zero-initialised injection decoder (exactly the base model, no document);
- `reading`: the zero-initialised injection decoder with reading layers from layer 0 and the
            shipped adapter's top chunks (kernels/reading.py: the chunks search keeps, read at
            full depth by the untrained base model; `ctxtree ask --adapter none --reading-from 0`);
- `base`:   the base model with the document in its prompt, truncated to its window
            (the whole document where it fits);
- `bm25`:   retrieval: the BM25 top-k passages of the document given to the base model;
- `teacher`: the base model with the *text* of the chunks the decoder's search selects in its
            prompt (what distillation trains the decoder to match, docs/quality.md).

Values: `single` and `multi` questions ask, in turn, a number, a code, a word, a name or a
date (data.VALUE_KINDS; the held-out words, names and layouts are never trained on).
Exact match: every expected value appears in the answer (data.is_correct: a number as a
whole number, anything else as whole words).

Prose (--prose N, default 16): N held-out questions about real passages (ctxtree/pipelines/
prose.py, the teacher's answers), scored by information recovered = 1 - KL(teacher ||
decoder) / KL(teacher || base model without the text), and the share of free answers that
are only a number (the shipped adapter's failure before distillation).
Reported per method and length: accuracy, per needle kind, seconds per question (answer
time; trees are built beforehand, as the endpoint has them, and their build time is
reported separately). --questions is per (length, kind): 13 gives 52 per point.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import re
import time
from collections import Counter
from pathlib import Path

import torch

from ctxtree.answer import answer_question
from ctxtree.cli_args import add_model_args, tree_config
from ctxtree.prompt import TEXT_QUESTION_PROMPT, chat_ids
from ctxtree.kernels.reading import BeyondWindow
from ctxtree.runtime import cache_dir, load_runtime, untrained_decoder
from ctxtree.kernels.generate import SamplingConfig, generate
from ctxtree.kernels.inject import InjectionDecoder, load_adapter
from ctxtree.kernels.tree import NOT_INJECTED, injected_chunks, node_spans
from ctxtree.pipelines.chunk_pool import ChunkCache
from ctxtree.answer import search
from ctxtree.pipelines.prose import heldout_prose
from ctxtree.pipelines.train_step import Example, information_recovered
from ctxtree.prompt import end_of_turn_id
from ctxtree.kernels.tree import ContextTree
from ctxtree.pipelines.data import KINDS, VALUE_KINDS, is_correct, load_haystack, make_sample, numbers_only

REPO = Path(__file__).resolve().parent.parent
METHODS = ("query", "vector", "right", "norope", "zero", "reading", "base", "bm25", "teacher")
INJECTED = ("query", "vector", "right", "norope")  # methods that need trained injection weights
LENGTHS = (1024, 2048, 4096, 8192, 16384, 32768, 65536)


# ---- BM25 over passages (the retrieval baseline) -------------------------------------

def passages(text: str, max_words: int = 100) -> list[str]:
    """Blank-line paragraphs, long ones cut into pieces of at most max_words words."""
    out = []
    for para in re.split(r"\n\s*\n", text):
        words = para.split()
        for i in range(0, len(words), max_words):
            out.append(" ".join(words[i:i + max_words]))
    return [p for p in out if p]


def _terms(s: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", s.lower())


def bm25_top(question: str, docs: list[str], k: int, k1: float = 1.5, b: float = 0.75) -> list[int]:
    """Indices of the k best passages for the question (Okapi BM25), best first."""
    tokenized = [_terms(d) for d in docs]
    n = len(docs)
    avg = sum(len(t) for t in tokenized) / max(1, n)
    df = Counter(term for t in tokenized for term in set(t))
    scores = []
    query = set(_terms(question))
    for t in tokenized:
        tf = Counter(t)
        s = 0.0
        for term in query:
            if term in tf:
                idf = math.log(1 + (n - df[term] + 0.5) / (df[term] + 0.5))
                s += idf * tf[term] * (k1 + 1) / (tf[term] + k1 * (1 - b + b * len(t) / avg))
        scores.append(s)
    return sorted(range(n), key=lambda i: -scores[i])[:k]


# ---- the methods ------------------------------------------------------------------------

def base_answer(rt, decoder: InjectionDecoder, context: str, question: str, sampling: SamplingConfig) -> str:
    prompt = chat_ids(rt.tokenizer, TEXT_QUESTION_PROMPT.format(context=context, question=question))
    tokens = []
    for step in generate(decoder, [prompt], None, sampling, rt.stop_ids, [torch.Generator().manual_seed(0)]):
        if step[0] is None or step[0] in rt.stop_ids:
            break
        tokens.append(step[0])
    return rt.tokenizer.decode(tokens)


def injected_level(tree, selection: torch.Tensor, position: int) -> int:
    """Tree level (1..h) of the injected node holding document token `position`; 0 if none."""
    chunk, offset = 0, position
    while offset >= tree.chunk_lengths[chunk]:
        offset -= tree.chunk_lengths[chunk]
        chunk += 1
    spans = node_spans(tree.chunk_lengths[chunk], tree.config.height)
    for node in selection[chunk].tolist():
        if node != NOT_INJECTED and spans[node][0] <= offset < spans[node][1]:
            return (node + 1).bit_length() - 1  # heap index -> level
    return 0


def base_context(rt, documents: list[list[int]], question: str, max_tokens: int) -> str:
    """The documents as they fit the base model's window: whole where they fit, else each
    cut to an equal share (the head of each document is kept, as users truncate)."""
    overhead = len(rt.tokenizer(TEXT_QUESTION_PROMPT.format(context="", question=question))["input_ids"]) + 64
    window = rt.model.cfg.max_position_embeddings - overhead - max_tokens
    per_document = max(0, window // len(documents))
    return "\n\n".join(rt.tokenizer.decode(d[:per_document]) for d in documents)


def selected_text(rt, trees: list[ContextTree], selections: list[torch.Tensor]) -> str:
    """The text of the chunks search keeps (in document order), as the teacher reads them."""
    parts = []
    for tree, sel in zip(trees, selections):
        starts = [0, *itertools.accumulate(tree.chunk_lengths)]
        parts += [rt.tokenizer.decode(tree.tokens[starts[c]:starts[c + 1]].tolist()) for c in injected_chunks(sel).tolist()]
    return "\n\n".join(parts)


def prose_quality(rt, decoder: InjectionDecoder, zero: InjectionDecoder, count: int, seed: int,
                  sampling: SamplingConfig) -> dict:
    """Held-out prose questions: information recovered, numbers-only answers, time per question."""
    items = heldout_prose(rt, count, seed)
    examples = [Example(trees=[tree], question=e.question, target=e.answer, teacher=e.teacher) for e, tree in items]
    recovered = information_recovered(decoder, zero, rt.tokenizer, end_of_turn_id(rt.tokenizer), examples)
    rt.decoder = decoder
    answers = []
    for e, tree in items:
        t0 = time.perf_counter()
        text = answer_question(rt, [tree], e.question, sampling).text
        answers.append({"question": e.question, "teacher": e.answer[:240], "answer": text[:240],
                        "numbers_only": numbers_only(text), "seconds": time.perf_counter() - t0})
        print(f"[quality] prose: {e.question!r} -> {text[:100]!r}", flush=True)
    return {"questions": len(items), **recovered,
            "numbers_only": sum(a["numbers_only"] for a in answers) / len(answers),
            "seconds_per_question": sum(a["seconds"] for a in answers) / len(answers), "items": answers}


def value_kind_of(kind: str, index: int) -> str:
    """What the values of sample `index` look like: lookups (single, multi) cycle through the
    value kinds; paraphrase and spread needles state numbers."""
    return VALUE_KINDS[index % len(VALUE_KINDS)] if kind in ("single", "multi") else "digits"


def heldout_samples(rt, haystack, lengths: list[int], kinds: list[str], questions: int, seed: int):
    """(length, kind, index, value kind, Sample) of the benchmark's held-out lookups, in order."""
    for length in lengths:
        for kind in kinds:
            for i in range(questions):
                values = value_kind_of(kind, i)
                yield length, kind, i, values, make_sample(rt.tokenizer, haystack, i, length, kind, seed=seed,
                                                           align=rt.tree_config.chunk_len, values=values)


def summarize(records: list[dict], height: int) -> dict:
    """Per method and length: accuracy, per needle kind, seconds per question, and where
    search put the asked values (the finest level, where every position is kept, or coarser)."""
    methods = [m for m in METHODS if m in {r["method"] for r in records}]
    lengths = sorted({r["length"] for r in records})
    results: dict = {m: {} for m in methods}
    for method in methods:
        for length in lengths:
            rs = [r for r in records if r["method"] == method and r["length"] == length]
            if not rs:
                continue
            kinds = sorted({r["kind"] for r in rs})
            results[method][str(length)] = {
                "accuracy": sum(r["correct"] for r in rs) / len(rs), "questions": len(rs),
                "per_kind": {k: sum(r["correct"] for r in rs if r["kind"] == k) / sum(1 for r in rs if r["kind"] == k)
                             for k in kinds},
                "per_value_kind": {v: sum(r["correct"] for r in rs if r.get("values", "digits") == v)
                                   / sum(1 for r in rs if r.get("values", "digits") == v)
                                   for v in sorted({r.get("values", "digits") for r in rs})},
                "seconds_per_question": sum(r["seconds"] for r in rs) / len(rs)}
            levels = [lv for r in rs for lv in (r["answer_level"] or [])]
            if levels:
                results[method][str(length)]["answer_in_finest_node"] = sum(lv == height for lv in levels) / len(levels)
    return results


def merge(paths: list[Path], out: Path, plot_path: Path) -> None:
    """One report from several runs over the same samples (e.g. the baselines and the
    injection decoder run in two processes): later files win for a method they both ran."""
    reports = [json.loads(p.read_text()) for p in paths]
    records: list[dict] = []
    for rep in reports:
        ran = {r["method"] for r in rep["records"]}
        records = [r for r in records if r["method"] not in ran] + rep["records"]
    for rep in reports[1:]:
        if rep["tree_config"] != reports[0]["tree_config"]:
            raise SystemExit(f"cannot merge runs with different tree configs: {[str(p) for p in paths]}")
    report = dict(reports[-1])
    report.update(records=records, results=summarize(records, report["tree_config"]["height"]),
                  merged_from=[str(p) for p in paths],
                  base_questions_cap=next((r["base_questions_cap"] for r in reports if r["base_questions_cap"]), None),
                  tree_build_tokens_per_s=next((r["tree_build_tokens_per_s"] for r in reports
                                                if r["tree_build_tokens_per_s"]), None))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    plot(report, plot_path)
    print(json.dumps({m: {k: v["accuracy"] for k, v in r.items()} for m, r in report["results"].items()}, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--questions", type=int, default=13, help="per (length, needle kind)")
    ap.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS))
    ap.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--base-questions", type=int, default=None,
                    help="cap per (length, kind) for `base` beyond 4K tokens (40 s a question at 8K)")
    ap.add_argument("--bm25-k", type=int, default=4, help="passages given to the base model")
    ap.add_argument("--max-tokens", type=int, default=48,
                    help="answer budget (the base model answers in sentences; the decoder stops early)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prose", type=int, default=16, help="held-out prose questions (0: none)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    ap.add_argument("--update", action="store_true",
                    help="keep --out's records of the methods not run now (e.g. rerun only the injection "
                         "methods after training; the samples are the same for the same seed)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "quality.json")
    ap.add_argument("--plot", type=Path, default=REPO / "docs" / "quality.png")
    add_model_args(ap)  # --model, --adapter and the tree settings, as `ctxtree ask` takes them
    ap.add_argument("--merge", type=Path, nargs="+", default=None,
                    help="run nothing: merge these result files (same samples, other methods) into --out")
    args = ap.parse_args()
    if args.merge:
        merge(args.merge, args.out, args.plot)
        return
    if args.threads:
        torch.set_num_threads(args.threads)

    rt = load_runtime(Path(args.model) if args.model else None, tree_config(args), adapter=args.adapter,
                      top_chunks=args.top_chunks, device=args.device, reading_from=args.reading_from)
    adapter_dir = rt.adapter_dir
    old = json.loads(args.out.read_text()) if args.update and args.out.is_file() else None
    if old is not None and old["tree_config"] != rt.tree_config.to_dict():  # checked before the hours of work
        raise SystemExit(f"--update: {args.out} was measured with trees {old['tree_config']}, this run's are "
                         f"{rt.tree_config.to_dict()} (pass the same --codec/--layers..., or another --out)")
    decoders = {"query": rt.decoder, "vector": rt.decoder, "right": rt.decoder,
                "norope": load_adapter(rt.model, adapter_dir, rt.weights_digest, "none", rt.decoder.top_chunks,
                                       rt.decoder.reading_from)
                if adapter_dir else None,
                "zero": InjectionDecoder(rt.model, rt.tree_config.n_layers).eval(),
                "reading": untrained_decoder(rt.model, rt.tree_config, top_chunks=rt.decoder.top_chunks or None,
                                             reading_from=0)}
    base_decoder = decoders["zero"]  # without injected context: exactly the base model
    haystack = load_haystack(rt.tokenizer, "heldout")
    chunks = ChunkCache(cache_dir() / "bench-chunks", rt.fingerprint, rt.model, rt.tree_config)
    sampling = SamplingConfig(max_tokens=args.max_tokens)
    build_s, built_tokens = 0.0, 0
    records = []
    t_start = time.perf_counter()
    for length, kind, i, values, s in heldout_samples(rt, haystack, args.lengths, args.kinds, args.questions,
                                                      args.seed):
        t0, before = time.perf_counter(), chunks.built
        trees = [chunks.document(d) for d in s.documents]
        if chunks.built > before:
            build_s += time.perf_counter() - t0
            built_tokens += (chunks.built - before) * rt.tree_config.chunk_len
        texts = None
        for method in args.methods:
            if method in INJECTED + ("teacher",) and adapter_dir is None:
                continue  # teacher: the chunks the adapter's search selects (none: the whole document)
            if (method == "base" and args.base_questions is not None and length > 4096
                    and i >= args.base_questions):
                continue
            t0 = time.perf_counter()
            level = None
            if method in INJECTED + ("zero", "reading"):
                rt.decoder = decoders[method]
                try:
                    answer = answer_question(rt, trees, s.question, sampling,
                                             policy=method if method in ("vector", "right") else "query")
                    ans = answer.text
                    level = [injected_level(trees[d], answer.selections[d], pos)
                             for d, pos in s.answer_positions]
                except BeyondWindow:  # reading layers and policy right (every chunk) past the window: refused
                    ans = "(refused: more injected text than the model's window)"
            else:
                texts = texts or s.texts(rt.tokenizer)
                if method == "teacher":
                    _, selections = search(rt, trees, s.question)
                    context = selected_text(rt, trees, selections)
                elif method == "base":
                    context = base_context(rt, s.documents, s.question, args.max_tokens)
                else:
                    ps = [p for t in texts for p in passages(t)]
                    top = sorted(bm25_top(s.question, ps, args.bm25_k))
                    context = "\n\n".join(ps[j] for j in top)
                ans = base_answer(rt, base_decoder, context, s.question, sampling)
            dt = time.perf_counter() - t0
            ok = is_correct(ans, s)
            records.append({"method": method, "length": length, "kind": kind, "index": i, "values": values,
                            "correct": ok, "seconds": dt, "answer": ans[:80], "expected": s.answers,
                            "answer_level": level})
        print(f"[quality] {length} {kind} {i}: " + " ".join(
            f"{r['method']}={'Y' if r['correct'] else 'n'}" for r in records
            if r["length"] == length and r["kind"] == kind and r["index"] == i),
            f"({time.perf_counter() - t_start:.0f} s)", flush=True)
    prose = prose_reading = None
    if args.prose and adapter_dir is not None and "query" in args.methods:
        prose = prose_quality(rt, decoders["query"], decoders["zero"], args.prose, args.seed, sampling)
    if args.prose and "reading" in args.methods:
        prose_reading = prose_quality(rt, decoders["reading"], decoders["zero"], args.prose, args.seed, sampling)
    rt.decoder = decoders["query"]
    build_rate = built_tokens / build_s if build_s else None
    if old is not None:
        records = [r for r in old["records"] if r["method"] not in args.methods] + records
        build_rate = build_rate or old.get("tree_build_tokens_per_s")  # every tree came from the cache this time
        prose = prose or old.get("prose")
        prose_reading = prose_reading or old.get("prose_reading")
    report = {
        "benchmark": "quality", "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                                            "platform": platform.platform()},
        "model": rt.ckpt_dir.name, "adapter": str(adapter_dir) if adapter_dir else None,
        "adapter_meta": json.loads((adapter_dir / "adapter.json").read_text()) if adapter_dir else None,
        "tree_config": rt.tree_config.to_dict(), "questions_per_length_and_kind": args.questions,
        "base_questions_cap": args.base_questions, "bm25_k": args.bm25_k,
        "tree_build_tokens_per_s": build_rate,
        "results": summarize(records, rt.tree_config.height), "prose": prose,
        "prose_reading": prose_reading, "records": records,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    plot(report, args.plot)
    print(json.dumps({m: {k: v["accuracy"] for k, v in r.items()} for m, r in report["results"].items()}, indent=1))


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for method, by_len in report["results"].items():
        if not by_len:
            continue
        xs = sorted(int(k) for k in by_len)
        ax.plot(xs, [100 * by_len[str(x)]["accuracy"] for x in xs], marker="o", label=method)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("document tokens")
    ax.set_ylabel("exact match, % (held-out)")
    ax.set_ylim(-2, 102)
    ax.axvline(8192, color="grey", linestyle=":", linewidth=1)
    lines = [f"ctxtree quality: {report['model']}"]
    for name, key in (("query", "prose"), ("reading", "prose_reading")):
        prose = report.get(key)
        if prose:
            lines.append(f"prose ({name}): information recovered {prose['recovered']:.2f}, numbers-only answers "
                         f"{100 * prose['numbers_only']:.0f}%")
    ax.set_title("\n".join(lines), fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
