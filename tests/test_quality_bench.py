"""bench/quality.py without a model: BM25 ranks the passage that holds the question's
terms first, and results from separate runs merge into one report and plot."""

from __future__ import annotations

import json

import pytest

from bench.quality import bm25_top, merge, passages

TREE = {"n_layers": 4, "chunk_len": 256, "height": 3, "keep": 32, "codec": "bf16", "dtype": "float32"}


def record(method, length, kind, index, correct, level=None):
    return {"method": method, "length": length, "kind": kind, "index": index, "correct": correct,
            "seconds": 0.5, "answer": "", "expected": ["1"], "answer_level": level}


def report(records, cap=None):
    return {"benchmark": "quality", "tree_config": TREE, "records": records, "results": {},
            "base_questions_cap": cap, "tree_build_tokens_per_s": None, "model": "m", "adapter": None}


def test_bm25_puts_the_passage_with_the_asked_terms_first():
    text = ("The harbour opens at dawn.\n\nThe locker code of the amber chapel is 4821.\n\n"
            "Ships leave the harbour at noon.")
    ps = passages(text)
    assert len(ps) == 3
    assert bm25_top("What is the locker code of the amber chapel?", ps, 1) == [1]


def test_runs_merge_into_one_report(tmp_path):
    base = tmp_path / "base.json"
    injected = tmp_path / "injected.json"
    base.write_text(json.dumps(report([record("base", 1024, "single", 0, True), record("base", 1024, "multi", 0, False),
                                       record("bm25", 1024, "single", 0, True)], cap=2)))
    injected.write_text(json.dumps(report([record("query", 1024, "single", 0, True, [3]),
                                           record("query", 1024, "multi", 0, True, [2])])))
    out, png = tmp_path / "quality.json", tmp_path / "quality.png"
    merge([base, injected], out, png)
    merged = json.loads(out.read_text())
    assert len(merged["records"]) == 5 and merged["base_questions_cap"] == 2
    assert merged["results"]["base"]["1024"]["accuracy"] == 0.5
    assert merged["results"]["base"]["1024"]["per_kind"] == {"multi": 0.0, "single": 1.0}
    assert merged["results"]["query"]["1024"]["answer_in_finest_node"] == 0.5
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**report([]), "tree_config": {**TREE, "chunk_len": 1024}}))
    with pytest.raises(SystemExit, match="different tree configs"):
        merge([base, other], out, png)
